"""The IBAL interaction-breaking attack (Lee, Kang, Jo, Han, "Interaction-Breaking Adversarial Learning Framework for
Robust Multi-Agent Reinforcement Learning", ICML 2026, arXiv 2605.18024) as runner hooks, and one-agent-missing.

IBAL's attacker does not push one agent towards a low-value action (Wolfpack and other value-oriented attacks); it
cuts the *dependency* between two groups of agents G and G': it masks, in every agent's observation, the features
that describe agents of the other group, and it perturbs actions, under a per-episode budget. No official code is
public; everything below is our reading of the spec (``/work/shared/specs/marl.md`` §5), each choice marked:

- **Observation layout** (:func:`observation_layout`): which feature block of agent i's observation describes which
  other agent. LBF 2.0's vector observation is ``max_num_food`` food triples (y, x, level), then one block per
  player (y, x[, level]): the observer first, then the other players *it sees* in index order; unseen slots hold
  (-1, -1, 0). With full sight every player is seen, so block k of agent i describes the k-th other agent in index
  order; partial-sight ids (``Foraging-2s-...``) do not say who a block is and are refused for masking.
- **Masking** writes the environment's own "not seen" encoding (-1, -1, 0, scaled like the observation) into the
  masked blocks, so a masked observation is one LBF could produce: the other agent looks out of sight
  (interpretation; the spec says "zero out / drop", and 0 is a real grid coordinate in LBF).
- **Interaction strength** (the spec's conditional MI I(a^G; τ^{G'} | s), estimator unknown): estimated greedily
  against the current Q, without a learned estimator: D[i, j] = KL(π_i(o^i) ‖ π_i(o^i with agent j's block
  masked)), π the softmax of agent i's standardized Q over its available actions (the scale-free softmax of
  Wolfpack's KL follow-ups). The expected KL between an agent's policy with and without a variable is the
  policy-influence form of their conditional mutual information (interpretation).
- **Which groups** (``group_rule``): ``"greedy"`` (default) takes, at every attacked step, the bipartition of the
  agents that maximizes the estimated cross-group interaction Σ_{i, j in different groups} D[i, j];
  ``"random"`` draws a bipartition per episode (the spec's "sampled per episode").
- **When** (``attack_prob``): an attacked step happens with probability 0.5 per step while the budget lasts
  (interpretation; the spec only says "budgeted, per step"). Every attacked slot counts one unit of the budget
  (``budget`` 12 in training, ``test_budget`` 8 in tests: WALL's, so the two are compared like for like), the
  episode's last observation included.
- **Action perturbation** (``action_agents`` per attacked step, default 1): the agent(s) with the largest
  cross-group interaction (row + column of D across the cut) execute ``action_rule="worst"`` (argmin of their Q
  over available actions: the spec's "worst-case Q as in WALL") or ``"random"`` (a uniformly random available
  action: independent of every other agent, i.e. zero MI, but a weak attack). The runner stores the agents'
  *intended* actions (the perturbation is part of the dynamics, as in WALL) and records ``masked`` (agents whose
  observation was masked), ``attacked`` (agents whose action was replaced), ``executed`` and ``group`` (1 for the
  agents of G at the step's cut, 0 otherwise and on clean steps).

:class:`OneAgentMissing`: one agent, drawn per episode, executes NOOP (action 0) for the whole episode (the spec's
agent-missing evaluation).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from leantrain.errors import ConfigError
from leantrain.marl.controller import NEG
from leantrain.marl.wolfpack import worst_actions


@dataclass
class IBALAttackConfig:
    budget: int = 12  # attacked steps per training episode (WALL's num_attack_train, like for like)
    test_budget: int = 8  # per test episode
    attack_prob: float = 0.5  # chance that a step is attacked while budget remains
    mask_observations: bool = True  # (a) cut the other group's feature blocks out of every observation
    action_agents: int = 1  # (b) agents whose action is perturbed per attacked step (0: masking only)
    action_rule: str = "worst"  # "worst": argmin own Q (the spec's WALL option) | "random": uniform available
    group_rule: str = "greedy"  # "greedy": the bipartition of largest estimated interaction | "random": per episode

    def __post_init__(self):
        for name, allowed in {"action_rule": ("worst", "random"), "group_rule": ("greedy", "random")}.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"ibal {name}={getattr(self, name)!r}; choose from {list(allowed)}")
        if min(self.budget, self.test_budget, self.action_agents) < 0:
            raise ConfigError(
                f"ibal budget, test_budget, action_agents must be >= 0 (got {self.budget}, {self.test_budget}, "
                f"{self.action_agents})"
            )
        if not 0.0 <= self.attack_prob <= 1.0:
            raise ConfigError(f"ibal attack_prob={self.attack_prob} must be in [0, 1]")


# ------------------------------------------------------------------ observation layout


@dataclass(frozen=True)
class ObservationLayout:
    """Where each agent's observation describes the other agents: ``blocks[i][j]`` is the feature slice of agent
    i's observation that describes agent j (absent for j == i), ``absent`` the values of a block nobody is in."""

    blocks: tuple[dict[int, slice], ...]
    absent: np.ndarray  # (block width,)

    def mask(self, obs: np.ndarray, cut: np.ndarray) -> np.ndarray:
        """``obs`` (E, N, O) with agent j's block blanked in agent i's observation wherever ``cut`` (E, N, N)[e, i, j];
        returns a copy, every other feature untouched."""
        out = obs.copy()
        for e, i, j in zip(*np.nonzero(cut), strict=True):
            if i != j:
                out[e, i, self.blocks[i][j]] = self.absent
        return out


def observation_layout(env) -> ObservationLayout:
    """The per-agent feature blocks of an environment's observations; LBF (full sight) only, else ConfigError."""
    core = getattr(getattr(env, "env", None), "unwrapped", None)
    if not getattr(env, "is_lbf", False) or core is None:
        raise ConfigError(
            "IBAL's observation masking needs the per-agent feature blocks of the observation; only LBF (lbf:...) "
            "provides them: set method_options mask_observations=false and group_rule=random for other environments"
        )
    if core._grid_observation:
        raise ConfigError("IBAL's observation masking needs LBF's vector observation (grid_observation=False)")
    if core.sight < max(core.field_size) - 1:
        raise ConfigError(
            f"LBF sight {core.sight} < field size {max(core.field_size)} - 1: its player blocks list the players an "
            "agent sees, not who they are, so IBAL cannot mask a given agent; use a full-sight id"
        )
    width = 3 if core._observe_agent_levels else 2
    start, n = 3 * core.max_num_food, env.info.n_agents
    blocks = []
    for i in range(n):
        others = [j for j in range(n) if j != i]  # block 0 is the observer, then the others in index order
        blocks.append({j: slice(start + width * (k + 1), start + width * (k + 2)) for k, j in enumerate(others)})
    absent = (np.array([-1.0, -1.0, 0.0][:width]) * env.obs_scale).astype(np.float32)
    return ObservationLayout(tuple(blocks), absent)


# ------------------------------------------------------------------ interaction estimate


def policy_log_probs(q: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """log softmax of Q standardized over the available actions (..., A); unavailable actions get ~0 probability."""
    avail = avail.bool()
    count = avail.sum(-1, keepdim=True).clamp_min(1)
    mean = (q * avail).sum(-1, keepdim=True) / count
    std = (((q - mean) * avail).pow(2).sum(-1, keepdim=True) / count).sqrt().clamp_min(1e-8)
    return F.log_softmax(((q - mean) / std).masked_fill(~avail, NEG), -1)


@torch.no_grad()
def interaction_matrix(mac, layout: ObservationLayout, obs: np.ndarray, avail: np.ndarray, last, hidden):
    """D (E, N, N): D[e, i, j] = KL(π_i(o^i) ‖ π_i(o^i without agent j)), agent i's policy shift when agent j's block
    is masked from its observation (0 on the diagonal). ``last`` (E, N) or None, ``hidden`` (E·N, H)."""
    e, n, _ = obs.shape
    avail_t = torch.as_tensor(avail)
    clean, _ = mac.step(torch.as_tensor(obs), last, hidden)  # (E, N, A)
    cut = np.zeros((n, e, n, n), bool)  # variant j blanks agent j in every other agent's observation
    for j in range(n):
        cut[j, :, :, j] = True
    masked = layout.mask(np.broadcast_to(obs, (n, *obs.shape)).reshape(n * e, n, -1), cut.reshape(n * e, n, n))
    rep_last = None if last is None else last.repeat(n, 1)
    q, _ = mac.step(torch.as_tensor(masked), rep_last, hidden.repeat(n, 1))  # (N·E, N, A)
    p = policy_log_probs(clean, avail_t)  # (E, N, A)
    pj = policy_log_probs(q.view(n, e, n, -1), avail_t.expand(n, -1, -1, -1))  # (N_j, E, N_i, A)
    kl = (p.exp() * (p - pj)).sum(-1)  # (N_j, E, N_i)
    return kl.permute(1, 2, 0).clamp_min(0).numpy()  # (E, N_i, N_j)


def bipartitions(n: int) -> np.ndarray:
    """Every split of n agents into two non-empty groups, once each: (P, N) bool, True = group G (agent 0 in G')."""
    rows = [np.array((0, *bits), bool) for bits in itertools.product((0, 1), repeat=n - 1) if any(bits)]
    return np.stack(rows) if rows else np.zeros((0, n), bool)


def cross_group(groups: np.ndarray) -> np.ndarray:
    """(..., N) bool groups -> (..., N, N): True where agents i and j are in different groups."""
    return groups[..., :, None] != groups[..., None, :]


# ------------------------------------------------------------------ the attack


class InteractionBreakingAttack:
    """The IBAL attack as the runner's ``observation_hook`` (masking) and ``action_hook`` (this object: its ``rng``
    is saved with a run's checkpoints). ``enabled`` off: clean episodes; ``episode_share``: the fraction of training
    episodes attacked (test episodes always are)."""

    def __init__(self, runner, mac, config: IBALAttackConfig, seed: int = 0, episode_share: float = 1.0):
        n = mac.info.n_agents
        if n < 2:
            raise ConfigError("IBAL needs at least two agents to break an interaction")
        if config.action_agents > n:
            raise ConfigError(f"ibal action_agents={config.action_agents} exceeds the {n} agents")
        needs_layout = config.mask_observations or config.group_rule == "greedy"
        self.layout = observation_layout(runner.envs[0]) if needs_layout else None
        self.runner, self.mac, self.config, self.episode_share = runner, mac, config, episode_share
        self.rng, self.enabled = np.random.default_rng(seed), True
        self.splits = bipartitions(n)
        runner.action_hook = self
        if config.mask_observations:
            runner.observation_hook = self.observe
        runner.store_intended = True
        runner.step_fields = {**runner.step_fields, "masked": (n,), "attacked": (n,), "executed": (n,), "group": (n,)}

    def budget(self) -> int:
        return self.config.test_budget if self.runner.test else self.config.budget

    def _reset(self, envs: int) -> None:
        n = self.mac.info.n_agents
        self.used = np.zeros(envs, int)
        if not self.enabled:
            self.on = np.zeros(envs, bool)
        elif self.runner.test or self.episode_share >= 1.0:
            self.on = np.ones(envs, bool)
        else:  # the mix of clean and attacked training episodes
            self.on = self.rng.random(envs) < self.episode_share
        self.groups = self.splits[self.rng.integers(len(self.splits), size=envs)]  # (E, N), group_rule="random"
        self.now = np.zeros(envs, bool)  # attacked at the current slot
        self.cut = np.zeros((envs, n, n), bool)  # (E, i, j): agent j blanked in agent i's observation
        self.score = np.zeros((envs, n))  # cross-group interaction per agent at the current slot
        self.hidden, self.last = self.mac.init_hidden(envs), None  # the agents' inputs at the coming step

    def _decide(self, obs: np.ndarray, avail: np.ndarray, candidates: np.ndarray) -> None:
        """Which environments are attacked at this slot, with which groups and which agents to perturb."""
        self.now[:] = False
        self.cut[:] = False
        for e in np.flatnonzero(candidates & self.on & (self.used < self.budget())):
            self.now[e] = self.rng.random() < self.config.attack_prob
        hit = np.flatnonzero(self.now)
        self.used[hit] += 1
        if not len(hit):
            return
        if self.layout is not None:
            last = None if self.last is None else self.last[torch.as_tensor(hit)]
            d = interaction_matrix(self.mac, self.layout, obs[hit], avail[hit], last, self._hidden(hit))  # (H, N, N)
        if self.config.group_rule == "greedy":
            sym = d + d.transpose(0, 2, 1)  # (H, N, N)
            strength = np.einsum("pij,hij->hp", cross_group(self.splits).astype(float), sym)  # (H, P)
            self.groups[hit] = self.splits[strength.argmax(1)]
        cross = cross_group(self.groups[hit])
        self.cut[hit] = cross
        if self.layout is not None:
            self.score[hit] = (d * cross).sum(2) + (d * cross).sum(1)
        else:
            self.score[hit] = self.rng.random((len(hit), self.mac.info.n_agents))

    def _hidden(self, rows: np.ndarray) -> torch.Tensor:
        n = self.mac.info.n_agents
        return self.hidden.view(-1, n, self.hidden.shape[-1])[torch.as_tensor(rows)].reshape(len(rows) * n, -1)

    def observe(self, t: int, obs: np.ndarray, state: np.ndarray, avail: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        if t == 0:
            self._reset(len(obs))
        self._decide(obs, avail, fresh)
        return self.layout.mask(obs, self.cut) if self.now.any() else obs

    def __call__(self, t, actions, q, avail, active):
        envs, n = actions.shape
        if t == 0 and not self.config.mask_observations:
            self._reset(envs)
        if not self.config.mask_observations:  # no observation hook: the decision is taken here
            self._decide(self.runner.current["obs"].numpy(), avail.numpy(), active)
        masked = self.cut.any(2) & active[:, None]
        forced = torch.zeros(envs, n, dtype=torch.bool)
        k = self.config.action_agents
        for e in np.flatnonzero(self.now & active):
            if k:
                forced[e, torch.as_tensor(np.argsort(-self.score[e], kind="stable")[:k])] = True
        if self.config.action_rule == "worst":
            replacement = worst_actions(q, avail)
        else:
            replacement = torch.multinomial(avail.float().view(envs * n, -1), 1).view(envs, n)
        executed = torch.where(forced, replacement, actions)
        self.hidden, self.last = self.runner.current["hidden"], actions  # intended actions are stored and fed back
        self.runner.record("masked", masked.astype(np.float32))
        self.runner.record("attacked", forced.float().numpy())
        self.runner.record("executed", executed.float().numpy())
        self.runner.record("group", (self.groups & (self.now & active)[:, None]).astype(np.float32))
        return executed


class OneAgentMissing:
    """One agent, drawn per episode, executes NOOP (action ``noop``, LBF's NONE) all episode: it is missing."""

    def __init__(self, runner, seed: int = 0, noop: int = 0):
        self.runner, self.noop, self.rng = runner, noop, np.random.default_rng(seed)
        runner.action_hook = self
        runner.step_fields = {**runner.step_fields, "executed": (runner.info.n_agents,)}

    def __call__(self, t, actions, q, avail, active):
        envs, n = actions.shape
        if t == 0:
            self.missing = self.rng.integers(n, size=envs)
        executed = actions.clone()
        rows = torch.arange(envs)
        missing = torch.as_tensor(self.missing)
        if not bool(avail[rows, missing, self.noop].all()):
            raise ConfigError(f"one-agent-missing: action {self.noop} (NOOP) is not always available here")
        executed[rows, missing] = self.noop
        self.runner.record("executed", executed.float().numpy())
        return executed
