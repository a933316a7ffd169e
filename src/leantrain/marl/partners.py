"""Frozen partners: a fixed policy plays one agent while the others learn or are evaluated (zero-shot coordination).

The ego of population methods for zero-shot coordination, FCP (Strouse et al. 2021, "Collaborating with Humans
without Human Data", arXiv 2110.08176) and SBC (Kang, Lee, Jo, Han, "Shaping Zero-Shot Coordination via State
Blocking", arXiv 2605.11688), is a best response to a population of frozen partners; their evaluation pairs a
policy with partners it never met (cross-play). Both run on the core's :class:`~leantrain.marl.runner.EpisodeRunner`
through its action hook, without a runner of their own:

- **Partners.** :class:`PolicyPartner`: a saved policy of any MARL run (its ``model.safetensors``, or a snapshot
  ``policies/t_env-*.safetensors``), frozen (no gradient, its own hidden state); it samples from its softmax in
  training episodes and takes its most probable action in test episodes. Scripted partners
  (:data:`SCRIPTED_PARTNERS`: ``random``, uniform over the available actions; ``greedy_cook``, Overcooked's
  :class:`~leantrain.marl.overcooked_scripted.GreedyCook`). Specs (strings) name them: a run folder, a
  ``.safetensors`` file inside a run folder's ``policies/``, or ``scripted:<name>`` (:func:`load_partner`).
- **:class:`PartnerHook`** (the runner's ``action_hook``): at the start of every episode each environment draws a
  partner uniformly from the population and the agent it plays (``partner_agent``: ``random``, the spec's
  randomised ego position, or a fixed index); at every step that agent's action is replaced by the partner's. It
  records the step field ``agent_mask`` (1 for the agents the ego plays), which MAPPO reads to keep the partner's
  agent-steps out of its policy loss (:data:`leantrain.marl.mappo.AGENT_MASK`); the executed (partner's) actions are
  what the batch stores, so the ego's observations and the critic see the real joint behaviour.
- **:class:`MappoBestResponse`** (``marl.algo: mappo-br``): MAPPO whose training runner carries a PartnerHook, tested
  as usual (the ego with itself, ``return_mean``) and with its partners (``partners_return_mean``). The reward is
  the real environment's; the critic V(s) is trained on every step.
- **:func:`crossplay`**: the return of an ego with one held-out partner, both greedy (or both sampling), the
  partner playing each agent in turn (equal episodes), on the real environment.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from leantrain.errors import ConfigError
from leantrain.marl.controller import MultiAgentController, greedy, sample_policy
from leantrain.marl.mappo import AGENT_MASK, MappoLearner
from leantrain.registry import Registry

# (env, agent, seed) -> act(avail (A,) bool numpy) -> action; built at the start of each episode
ScriptedBuilder = Callable[..., Callable[[np.ndarray], int]]
SCRIPTED_PARTNERS: Registry[ScriptedBuilder] = Registry("scripted partner")


@SCRIPTED_PARTNERS.register("random")
def _random_partner(env, agent: int, seed: int):
    rng = np.random.default_rng(seed)
    return lambda avail: int(rng.choice(np.flatnonzero(avail)))


@SCRIPTED_PARTNERS.register("greedy_cook")
def _greedy_cook(env, agent: int, seed: int):
    from leantrain.marl.overcooked_scripted import GreedyCook

    if not hasattr(env, "planner"):
        raise ConfigError(f"the scripted partner greedy_cook plays Overcooked only, not {type(env).__name__}")
    cook = GreedyCook(agent, seed)
    return lambda avail: cook.act(env)


class PolicyPartner:
    """A saved policy, frozen: ``start`` new episodes, then ``act`` once per step for the agents it plays."""

    def __init__(self, mac: MultiAgentController, name: str):
        self.mac, self.name = mac.eval().requires_grad_(False), name

    def start(self, envs: list, agents: np.ndarray, rng: np.random.Generator) -> dict:
        return {"h": self.mac.init_hidden(len(agents)), "agents": torch.as_tensor(agents)}

    def act(self, state: dict, obs: torch.Tensor, last: torch.Tensor | None, avail: torch.Tensor, test: bool,
            generator: torch.Generator) -> torch.Tensor:  # fmt: skip
        """obs (R, N, O), last (R, N) or None, avail (R, N, A) of its R environments -> its actions (R,)."""
        q, state["h"] = self.mac.step(obs, last, state["h"])  # every agent's logits: the network runs per agent
        rows = torch.arange(len(obs))
        logits, mask = q[rows, state["agents"]].unsqueeze(1), avail[rows, state["agents"]].unsqueeze(1)  # (R, 1, A)
        picked = greedy(logits, mask) if test else sample_policy(logits, mask, 0.0, None, generator)
        return picked.squeeze(1)


class ScriptedPartner:
    """A scripted agent (:data:`SCRIPTED_PARTNERS`), one instance per environment and episode."""

    def __init__(self, name: str):
        self.build, self.name = SCRIPTED_PARTNERS.pick(name), f"scripted:{name}"

    def start(self, envs: list, agents: np.ndarray, rng: np.random.Generator) -> list:
        return [(self.build(env, int(a), int(rng.integers(2**31))), int(a))
                for env, a in zip(envs, agents, strict=True)]  # fmt: skip

    def act(self, state: list, obs, last, avail: torch.Tensor, test: bool, generator) -> torch.Tensor:
        return torch.tensor([actor(avail[r, a].numpy()) for r, (actor, a) in enumerate(state)], dtype=torch.int64)


class PartnerHook:
    """The runner's action hook that hands one agent per environment to a frozen partner (module docstring).

    ``partners``: the population, or a callable returning it (loaded at the first episode). ``partner_agent``:
    ``"random"`` (drawn per episode and environment) or an agent index. ``sample``: whether partners sample in
    training episodes (test episodes are greedy)."""

    def __init__(self, runner, partners: Sequence | Callable[[], Sequence], partner_agent: str | int = "random",
                 seed: int = 0, sample: bool = True):  # fmt: skip
        self.runner, self._partners, self.partner_agent, self.sample = runner, partners, partner_agent, sample
        self.rng = np.random.default_rng(seed)  # who plays with whom; saved with the run's checkpoints
        self.groups: list = []
        runner.action_hook = self
        runner.step_fields[AGENT_MASK] = (runner.info.n_agents,)

    @property
    def partners(self) -> Sequence:
        if callable(self._partners):
            self._partners = self._partners()
        return self._partners

    def start_episodes(self) -> None:
        envs, n = self.runner.envs, self.runner.info.n_agents
        which = self.rng.integers(len(self.partners), size=len(envs))
        if self.partner_agent == "random":
            self.agents = self.rng.integers(n, size=len(envs))
        else:
            self.agents = np.full(len(envs), int(self.partner_agent))
        self.mask = np.ones((len(envs), n), np.float32)
        self.mask[np.arange(len(envs)), self.agents] = 0.0
        self.groups = []
        for j in np.unique(which).tolist():
            rows = np.flatnonzero(which == j)
            state = self.partners[j].start([envs[r] for r in rows], self.agents[rows], self.rng)
            self.groups.append((self.partners[j], torch.as_tensor(rows), state))

    def __call__(self, t: int, actions: torch.Tensor, q, avail: torch.Tensor, active: np.ndarray) -> torch.Tensor:
        if t == 0:
            self.start_episodes()
        obs, last = self.runner.current["obs"], self.runner.current["last_actions"]
        test = self.runner.test or not self.sample
        out = actions.clone()
        for partner, rows, state in self.groups:
            picked = partner.act(state, obs[rows], None if last is None else last[rows], avail[rows], test,
                                 self.runner.generator)  # fmt: skip
            out[rows, torch.as_tensor(self.agents[rows.numpy()])] = picked
        self.runner.record(AGENT_MASK, self.mask)
        return out


# ---------------------------------------------------------------- loading partners


POLICY_LEARNERS = ("mappo", "mappo-br")  # runs whose saved policy a partner can be (MAPPO's softmax policies)


def load_policy(run_dir: str | Path, file: str | Path | None = None) -> MultiAgentController:
    """The policy (controller) of a MAPPO run folder: its ``model.safetensors``, or ``file`` (a snapshot).

    Built from the run's config.yaml as its learner built it (:func:`leantrain.marl.mappo.mappo_actor`) and loaded
    from the ``mac.*`` tensors; the run's environments are not built beyond one for its shapes."""
    from safetensors.torch import load_file

    from leantrain.config import resolve
    from leantrain.marl.envs import make_env
    from leantrain.marl.mappo import MappoConfig, mappo_actor

    run_dir = Path(run_dir)
    file = Path(file) if file is not None else run_dir / "model.safetensors"
    if not (run_dir / "config.yaml").is_file() or not file.is_file():
        raise ConfigError(f"partner {file}: not a policy of a finished MARL run folder (config.yaml, safetensors)")
    m = resolve(str(run_dir / "config.yaml"), ["progress=none"]).marl
    if m.algo not in POLICY_LEARNERS:
        raise ConfigError(f"partner {run_dir} is a {m.algo} run; partners are MAPPO policies ({POLICY_LEARNERS})")
    env = make_env(m.env, m.switch_episode, counts=False, **m.env_args)
    env.close()
    options = MappoConfig(**{k: v for k, v in m.method_options.items() if k not in BEST_RESPONSE_OPTIONS})
    mac = mappo_actor(env.info, m, options)
    tensors = load_file(str(file))
    try:
        mac.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("mac.")})
    except RuntimeError as err:
        raise ConfigError(f"partner {file} does not fit its run's config: {err}") from None
    return mac


def load_partner(spec: str) -> PolicyPartner | ScriptedPartner:
    """``scripted:<name>``, a run folder (its final policy) or a ``.safetensors`` in a run folder's ``policies/``."""
    kind, _, name = str(spec).partition(":")
    if kind == "scripted":
        return ScriptedPartner(name)
    path = Path(spec)
    if path.suffix == ".safetensors":
        return PolicyPartner(load_policy(path.parent.parent, path), str(spec))
    return PolicyPartner(load_policy(path), str(spec))


# ---------------------------------------------------------------- the ego: MAPPO best response


@dataclass
class BestResponseConfig:
    partners: list[str] = field(default_factory=list)  # partner specs (see load_partner), drawn uniformly
    partner_agent: str | int = "random"  # the agent a partner plays: random per episode, or a fixed index
    partner_actions: str = "sample"  # partners in training episodes: sample (from their softmax) or greedy

    def __post_init__(self):
        if not self.partners or not all(isinstance(p, str) and p for p in self.partners):
            raise ConfigError(f"marl.method_options for mappo-br: partners={self.partners!r} must be a non-empty "
                              "list of run folders, policies/*.safetensors files or scripted:<name>")  # fmt: skip
        agent = self.partner_agent
        if agent != "random" and (isinstance(agent, bool) or not isinstance(agent, int) or agent < 0):
            raise ConfigError(f"mappo-br partner_agent={agent!r} must be 'random' or an agent index")
        if self.partner_actions not in ("sample", "greedy"):
            raise ConfigError(f"mappo-br partner_actions={self.partner_actions!r} must be 'sample' or 'greedy'")

    @classmethod
    def pop_from(cls, options: dict) -> BestResponseConfig:
        """This config's fields taken out of ``options`` (the rest are MAPPO's)."""
        return cls(**{name: options.pop(name) for name in BEST_RESPONSE_OPTIONS if name in options})


BEST_RESPONSE_OPTIONS = tuple(f.name for f in fields(BestResponseConfig))  # the rest of mappo-br's options: MAPPO's


class MappoBestResponse(MappoLearner):
    """MAPPO against a population of frozen partners (module docstring); ``partners`` is a
    :class:`BestResponseConfig`."""

    def __init__(self, mac, config, mappo=None, seed: int = 0, partners: BestResponseConfig | None = None):
        super().__init__(mac, config, mappo, seed)
        if partners is None:
            raise ConfigError("mappo-br needs partners (marl.method_options partners: [...])")
        agents = mac.info.n_agents
        if partners.partner_agent != "random" and partners.partner_agent >= agents:
            raise ConfigError(f"mappo-br partner_agent={partners.partner_agent} but there are {agents} agents")
        self.br, self.seed = partners, seed
        self._population: list | None = None

    def population(self) -> list:
        """The partners, loaded once (at the first episode that needs them)."""
        if self._population is None:
            self._population = [load_partner(spec) for spec in self.br.partners]
        return self._population

    def attach(self, runner) -> None:
        super().attach(runner)
        PartnerHook(runner, self.population, self.br.partner_agent, seed=self.seed + 1,
                    sample=self.br.partner_actions == "sample")  # fmt: skip

    def evaluation_runners(self, make_runner) -> dict:
        runner = make_runner(30_011)
        PartnerHook(runner, self.population, self.br.partner_agent, seed=self.seed + 2)
        return {"partners": runner}


# ---------------------------------------------------------------- cross-play


def crossplay(ego: MultiAgentController, partner, envs: list, episodes: int, seed: int = 0,
              sample: bool = False) -> dict:  # fmt: skip
    """Episodes of ``ego`` with ``partner`` (a loaded partner) on ``envs``, both greedy (or both sampling from their
    softmax: ``sample``): the partner plays agent 0 in the first ``episodes / N`` (rounded up), agent 1 in the next,
    ...; returns every return, the mean, the standard deviation over episodes and the mean per agent the partner
    played (``by_partner_agent``)."""
    from leantrain.marl.runner import EpisodeRunner

    runner = EpisodeRunner(envs, ego, seed=seed)
    runner.select_actions = sample_policy
    hook = PartnerHook(runner, [partner], seed=seed, sample=sample)
    per_agent = math.ceil(episodes / envs[0].info.n_agents)
    returns: dict[int, list[float]] = {}
    for agent in range(envs[0].info.n_agents):
        hook.partner_agent = agent
        got: list[float] = []
        while len(got) < per_agent:
            got += runner.run(0.0, test=not sample)[1].returns
        returns[agent] = got[:per_agent]
    flat = [r for agent in returns for r in returns[agent]]
    return {"mean": statistics.fmean(flat), "std": statistics.pstdev(flat), "returns": flat,
            "by_partner_agent": {a: statistics.fmean(r) for a, r in returns.items()}}  # fmt: skip
