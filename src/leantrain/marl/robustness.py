"""How much return a trained policy keeps under attack: clean, Wolfpack, random-step and random attacks.

:func:`evaluate_attacks` loads a MARL run folder, fits a fresh Wolfpack planner against the fixed policy (the
attacker learns the policy it attacks: episodes collected under the random attack so the world model sees
attacked transitions, then ``fit_updates`` planner updates on them) and returns the mean greedy return of
``episodes`` episodes per condition, all with the test budget (8 attacked steps per episode):

- ``clean``: no attack;
- ``wolfpack``: planner-chosen critical step and initial agent, KL follow-ups (the paper's attack);
- ``wolfpack_std``: the same planner with ``damage_scale="std"`` (the predicted damages standardized before the
  softmax of temperature 0.5: the timing rule made independent of the task's Q scale, ours);
- ``random_step``: a cycle starts with probability 0.1 per step, random initial agent, KL follow-ups (the
  official random baseline: only the timing and victim are not planned);
- ``random``: random steps, random initial agent and random follow-ups (same budget, no planning at all).

The same procedure is applied to every policy compared (vanilla QMIX and WALL), so neither attacker is stronger
because of how it was trained.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from leantrain.errors import ConfigError
from leantrain.marl.wolfpack import WolfpackAttack, WolfpackConfig, WolfpackPlanner

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


def evaluate_attacks(run_dir: str | Path, episodes: int = 200, fit_episodes: int = 200, fit_updates: int = 300,
                     seed: int = 0, config: WolfpackConfig | None = None, stage=None,
                     **changes) -> dict[str, float]:  # fmt: skip
    """Mean greedy return per condition (clean, wolfpack, random_step, random) of a run's saved policy.

    ``config``: the attack (default: a WALL run's own, else the paper's with 2 follow-ups, fewer for smaller
    teams); ``changes``: fields replaced in it (e.g. ``test_budget=4``); ``stage(text)`` is called before each
    stage (progress for long evaluations)."""
    from leantrain.marl.runner import EpisodeRunner

    stage = stage or (lambda text: None)
    if min(episodes, fit_episodes) < 1 or fit_updates < 0:
        raise ConfigError("evaluate_attacks needs episodes >= 1, fit_episodes >= 1 and fit_updates >= 0")
    cfg, envs, mac, learner = load_run(run_dir)
    n = mac.info.n_agents
    config = config or getattr(learner, "attack", None) or WolfpackConfig(followups=min(2, n - 1))
    try:
        config = dataclasses.replace(config, **changes)
    except TypeError as err:
        raise ConfigError(f"attack options: {err}") from None
    stage(f"fitting a Wolfpack planner against the policy: {fit_episodes} episodes, {fit_updates} updates")
    planner = fit_planner(mac, learner.mixer, envs, config, fit_episodes, fit_updates, seed=seed)
    stage(f"clean: {episodes} greedy episodes")
    out = {"clean": EpisodeRunner(envs, mac, seed=seed + 11).test_return(episodes)}
    for name, change in CONDITIONS.items():
        stage(f"{name} attack: {episodes} greedy episodes, budget {config.test_budget}")
        runner = EpisodeRunner(envs, mac, seed=seed + 11)  # the same episode seeds in every condition
        WolfpackAttack(runner, mac, learner.mixer, planner, dataclasses.replace(config, **change), seed=seed)
        out[name] = runner.test_return(episodes)
    for env in envs:
        env.close()
    return out
