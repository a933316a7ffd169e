"""How much return a trained policy keeps under attack: clean, Wolfpack, random, IBAL and one-agent-missing.

:func:`evaluate_attacks` loads a MARL run folder and returns the mean greedy return of ``episodes`` episodes per
condition of the attack suite :data:`ATTACKS` (a registry: :func:`register_attack` adds one; every condition runs on
the same episode seeds), all budgeted ones with the test budget (8 attacked steps per episode). The Wolfpack
conditions share a fresh planner fitted against the fixed policy (the attacker learns the policy it attacks:
episodes collected under the random attack so the world model sees attacked transitions, then ``fit_updates``
planner updates on them), fitted once when the first of them runs:

- ``clean``: no attack;
- ``wolfpack``: planner-chosen critical step and initial agent, KL follow-ups (the paper's attack);
- ``wolfpack_std``: the same planner with ``damage_scale="std"`` (the predicted damages standardized before the
  softmax of temperature 0.5: the timing rule made independent of the task's Q scale, ours);
- ``random_step``: a cycle starts with probability 0.1 per step, random initial agent, KL follow-ups (the
  official random baseline: only the timing and victim are not planned);
- ``random``: random steps, random initial agent and random follow-ups (same budget, no planning at all);
- ``ibal``: IBAL's interaction-breaking attack (:mod:`leantrain.marl.ibal_attack`: cross-group observation masking
  and worst-action perturbation, greedy against the policy's own Q, no fitting; an IBAL run's own attack settings,
  else the defaults), skipped with a note on environments without per-agent observation blocks (LBF only);
- ``one_agent_missing``: one agent, drawn per episode, executes NOOP (action 0) for the whole episode.

The same procedure is applied to every policy compared (vanilla QMIX, WALL, IBAL), so neither attacker is stronger
because of how it was trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from leantrain.errors import ConfigError
from leantrain.marl.ibal_attack import IBALAttackConfig, InteractionBreakingAttack, OneAgentMissing
from leantrain.marl.wolfpack import WolfpackAttack, WolfpackConfig, WolfpackPlanner
from leantrain.registry import Registry

CONDITIONS = {
    "wolfpack": {},
    "wolfpack_std": {"damage_scale": "std"},
    "random_step": {"step_method": "random", "initial_agent": "random"},
    "random": {"step_method": "random", "initial_agent": "random", "followup": "random"},
}


def load_run(run_dir: str | Path):
    """(config, environments, controller, learner) of a finished MARL run, its saved policy loaded."""
    from leantrain.config import resolve
    from leantrain.marl.run import build, policy_file

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "model.safetensors").is_file():
        raise ConfigError(f"{run_dir} is not a finished MARL run folder (config.yaml and model.safetensors)")
    # the run's own policy is loaded below: the one it started from (possibly deleted since) is not needed
    cfg = resolve(str(run_dir / "config.yaml"), ["progress=none", "marl.pretrained_policy=null"])
    if cfg.marl.env is None:
        raise ConfigError(f"{run_dir} is not a MARL run (its config has no marl.env)")
    envs, test_envs, mac, learner, _ = build(cfg)
    for env in test_envs:
        env.close()
    learner.load_policy(policy_file(run_dir))
    return cfg, envs, mac, learner


def fit_planner(mac, mixer, envs, config: WolfpackConfig, episodes: int = 200, updates: int = 300,
                batch: int = 32, lr: float = 5e-4, seed: int = 0) -> WolfpackPlanner:  # fmt: skip
    """A Wolfpack planner trained against a fixed policy on episodes collected under the random attack."""
    from leantrain.marl.episodes import ReplayBuffer
    from leantrain.marl.runner import EpisodeRunner

    torch.manual_seed(seed)
    planner = WolfpackPlanner(mac, config, lr=lr, seed=seed)
    runner = EpisodeRunner(envs, mac, seed=seed + 7)
    WolfpackAttack(runner, mac, mixer, None, dataclasses.replace(config, **CONDITIONS["random"]), seed=seed)
    buffer = ReplayBuffer(episodes, seed=seed)
    while len(buffer) < episodes:
        buffer.insert(runner.run(0.0, test=True)[0])
    for _ in range(updates):
        planner.fit(buffer.sample(min(batch, len(buffer))), mac, mixer)
    return planner


@dataclass
class AttackContext:
    """What the conditions of one evaluation share: the fixed policy, the attacks' configs, the Wolfpack planner
    (fitted on first use by :meth:`planner`) and the seed."""

    mac: object
    mixer: object
    envs: list
    wolfpack: WolfpackConfig
    ibal: IBALAttackConfig
    seed: int = 0
    fit_episodes: int = 200
    fit_updates: int = 300
    stage: Callable[[str], None] = lambda text: None
    fitted: WolfpackPlanner | None = None

    def planner(self) -> WolfpackPlanner:
        if self.fitted is None:
            self.stage(f"fitting a Wolfpack planner against the policy: {self.fit_episodes} episodes, "
                       f"{self.fit_updates} updates")  # fmt: skip
            self.fitted = fit_planner(self.mac, self.mixer, self.envs, self.wolfpack, self.fit_episodes,
                                      self.fit_updates, seed=self.seed)  # fmt: skip
        return self.fitted


AttackInstaller = Callable[[object, AttackContext], None]  # (runner, context): installs the attack's hooks
ATTACKS: Registry[AttackInstaller] = Registry("attack")
register_attack = ATTACKS.register


@register_attack("clean")
def _clean(runner, ctx: AttackContext) -> None:
    """No attack."""


def _wolfpack(change: dict) -> AttackInstaller:
    def install(runner, ctx: AttackContext) -> None:
        config = dataclasses.replace(ctx.wolfpack, **change)
        planned = config.step_method == "planner" or config.initial_agent == "planner"
        WolfpackAttack(runner, ctx.mac, ctx.mixer, ctx.planner() if planned else None, config, seed=ctx.seed)

    return install


for _name, _change in CONDITIONS.items():
    register_attack(_name)(_wolfpack(_change))


@register_attack("ibal")
def _ibal(runner, ctx: AttackContext) -> None:
    InteractionBreakingAttack(runner, ctx.mac, ctx.ibal, seed=ctx.seed)


@register_attack("one_agent_missing")
def _one_agent_missing(runner, ctx: AttackContext) -> None:
    OneAgentMissing(runner, seed=ctx.seed)


def evaluate_attacks(run_dir: str | Path, episodes: int = 200, fit_episodes: int = 200, fit_updates: int = 300,
                     seed: int = 0, config: WolfpackConfig | None = None, stage=None,
                     attacks: Sequence[str] | None = None, **changes) -> dict[str, float]:  # fmt: skip
    """Mean greedy return per condition of the attack suite (default every registered one) of a run's saved policy.

    ``config``: the Wolfpack attack (default: a WALL run's own, else the paper's with 2 follow-ups, fewer for smaller
    teams); ``changes``: fields replaced in it (e.g. ``test_budget=4``; IBAL's attack takes the same test budget);
    ``attacks``: the conditions to run (names in :data:`ATTACKS`; by default all, skipping with a note those the
    environment does not support); ``stage(text)`` is called before each stage (progress for long evaluations)."""
    from leantrain.marl.runner import EpisodeRunner

    stage = stage or (lambda text: None)
    if min(episodes, fit_episodes) < 1 or fit_updates < 0:
        raise ConfigError("evaluate_attacks needs episodes >= 1, fit_episodes >= 1 and fit_updates >= 0")
    names = list(ATTACKS) if attacks is None else list(attacks)
    for name in names:
        ATTACKS.pick(name)
    cfg, envs, mac, learner = load_run(run_dir)
    if not hasattr(learner, "mixer"):
        raise ConfigError(f"{run_dir}: the attacks need a value-decomposition run (a mixer); "
                          f"marl.algo={cfg.marl.algo} has none")  # fmt: skip
    n = mac.info.n_agents
    config = config or getattr(learner, "attack", None) or WolfpackConfig(followups=min(2, n - 1))
    try:
        config = dataclasses.replace(config, **changes)
    except TypeError as err:
        raise ConfigError(f"attack options: {err}") from None
    ibal = getattr(getattr(learner, "ibal", None), "attack", None) or IBALAttackConfig()
    ibal = dataclasses.replace(ibal, test_budget=config.test_budget)
    ctx = AttackContext(mac, learner.mixer, envs, config, ibal, seed, fit_episodes, fit_updates, stage)
    out = {}
    for name in names:
        runner = EpisodeRunner(envs, mac, seed=seed + 11)  # the same episode seeds in every condition
        try:
            ATTACKS[name](runner, ctx)
        except ConfigError as err:
            if attacks is not None:
                raise
            stage(f"{name}: skipped ({err})")
            continue
        budget = "" if name in ("clean", "one_agent_missing") else f", budget {config.test_budget}"
        stage(f"{name}: {episodes} greedy episodes{budget}")
        out[name] = runner.test_return(episodes)
    for env in envs:
        env.close()
    return out
