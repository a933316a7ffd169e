"""FIM's focus set: which state dimensions the agents are rewarded for influencing ("Center of Gravity-Guided
Focusing Influence Mechanism for Multi-Agent Reinforcement Learning", Park, Lee, Han, arXiv 2506.19417).

v1 of the paper picks *Center of Gravity* (CoG) dimensions, those that are stable under the agents' current
behaviour; v2 picks under-explored dimensions with an entropy criterion. The formulas are not public, so both are
interpretations (see :mod:`leantrain.marl.fim`):

- ``"cog"``: score_d = E[(s_{t+1,d} − s_{t,d})²], the mean squared change over every real transition; the focus set
  is the k dimensions of lowest score. The spec's reference interpretation says Var[s_{t+1,d} − s_{t,d}]; the
  uncentered moment is used because a dimension that drifts at a constant rate (a timer) has zero variance of its
  change yet is anything but stable. Where changes average to zero the two agree.
- ``"entropy"``: score_d = entropy of a ``bins``-bin histogram of the visited values of s_d over [min_d, max_d];
  the focus set is the k dimensions of lowest entropy.

Both exclude dimensions that never vary (Var[s_d] = 0 over the statistics' data: padding, ids, constants), where the
criterion is degenerate. Two sources of statistics:

- **exact** (default): over every state stored in the replay. The learner only sees sampled batches, so
  :class:`ReplayStates` mirrors the replay's states through a runner step hook (training episodes only, the
  episodes the run loop inserts into the replay) in a ring of the replay's capacity, flushed in the replay's
  insertion order: slot by slot the same states as the replay (tested).
- **running**: :class:`RunningDimensionStats`, exponential moving averages of each sampled batch's moments and
  histogram. An approximation: it weighs what was sampled recently, not the replay's contents; its difference from
  the exact form is measured in ``tests/marl/test_fim.py`` and reported in ``docs/fim.md``.
"""

from __future__ import annotations

import numpy as np
import torch

from leantrain.errors import ConfigError

CRITERIA = ("cog", "entropy")
CONSTANT = 1e-10  # a dimension whose value variance is below this never varies


class ReplayStates:
    """A ring of the last ``capacity`` training episodes' states (capacity, limit + 1, S) and lengths, filled by a
    runner step hook in the order the run loop inserts episodes into its replay."""

    def __init__(self, capacity: int, episode_limit: int, state_dim: int):
        if capacity < 1:
            raise ConfigError(f"FIM replay capacity {capacity} must be >= 1")
        self.capacity = capacity
        self.states = torch.zeros(capacity, episode_limit + 1, state_dim)
        self.lengths = torch.zeros(capacity, dtype=torch.long)
        self.count = 0  # episodes ever stored
        self.pending: np.ndarray | None = None  # (E, limit + 1, S) episodes in progress
        self.pending_lengths: np.ndarray | None = None

    def attach(self, runner) -> None:
        runner.step_hooks.append(self)

    def __call__(self, t: int, transition: dict) -> None:
        state, active = transition["state"], transition["active"]
        if t == 0:
            self.flush()  # a new runner batch: the previous one is in the replay now
            self.pending = np.zeros((state.shape[0], *self.states.shape[1:]), np.float32)
            self.pending_lengths = np.zeros(state.shape[0], np.int64)
        self.pending[active, t] = state[active]
        self.pending[active, t + 1] = transition["next_state"][active]
        self.pending_lengths[active] = t + 1

    def flush(self) -> None:
        """Store the episodes of the last runner batch (the run loop inserted them into the replay: row order)."""
        if self.pending is None:
            return
        for states, length in zip(self.pending, self.pending_lengths, strict=True):
            slot = self.count % self.capacity
            self.states[slot], self.lengths[slot] = torch.from_numpy(states), int(length)
            self.count += 1
        self.pending = self.pending_lengths = None

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (M, limit + 1, S), transition mask (M, limit)) of the stored episodes."""
        m = len(self)
        steps = torch.arange(self.states.shape[1] - 1)
        return self.states[:m], (steps[None] < self.lengths[:m, None]).float()

    def state(self) -> dict:
        self.flush()  # a checkpoint is taken between runner batches: the pending one is in the replay already
        m = len(self)
        return {"states": self.states[:m].clone(), "lengths": self.lengths[:m].clone(), "count": self.count}

    def load_state(self, state: dict) -> None:
        m = len(state["lengths"])
        self.states[:m], self.lengths[:m], self.count = state["states"], state["lengths"], int(state["count"])


def _slot_mask(filled: torch.Tensor) -> torch.Tensor:
    """Real slots (B, T+1) of a transition mask (B, T): every state of an episode, its last one included."""
    lengths = filled.sum(1).long()
    return (torch.arange(filled.shape[1] + 1)[None] <= lengths[:, None]).float()


def _moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean and mean square per last dimension: x (..., S), mask (...) -> (S,), (S,)."""
    w = mask.reshape(-1, 1)
    n = w.sum().clamp_min(1)
    flat = x.reshape(-1, x.shape[-1])
    return (flat * w).sum(0) / n, (flat.square() * w).sum(0) / n


def histograms(values: torch.Tensor, mask: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bins: int):
    """Per-dimension counts (S, bins) of ``values`` (..., S) at ``mask`` over [low_d, high_d] (equal-width bins)."""
    flat, keep = values.reshape(-1, values.shape[-1]), mask.reshape(-1) > 0
    flat = flat[keep]  # (M, S)
    width = (high - low).clamp_min(1e-12)
    idx = ((flat - low) / width * bins).floor().long().clamp(0, bins - 1)  # (M, S)
    offsets = torch.arange(flat.shape[1]) * bins
    counts = torch.bincount((idx + offsets).reshape(-1), minlength=flat.shape[1] * bins)
    return counts.reshape(flat.shape[1], bins).float()


def entropy(counts: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of non-negative counts (S, bins) -> (S,)."""
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def exact_scores(states: torch.Tensor, filled: torch.Tensor, criterion: str, bins: int = 20):
    """Scores (S,) and the varying dimensions (S,) bool over every real state / transition of ``states``
    (B, T+1, S) with transition mask ``filled`` (B, T)."""
    slots = _slot_mask(filled)
    mean, square = _moments(states, slots)
    varying = (square - mean.square()) > CONSTANT
    if criterion == "cog":
        return _moments(states[:, 1:] - states[:, :-1], filled)[1], varying
    flat = states.reshape(-1, states.shape[-1])[slots.reshape(-1) > 0]
    low, high = flat.min(0).values, flat.max(0).values
    return entropy(histograms(states, slots, low, high, bins)), varying


class RunningDimensionStats:
    """Exponential moving averages (decay ``decay``) of sampled batches' per-dimension moments (value, change) and
    value histograms; the histogram's edges are the running minimum and maximum seen so far."""

    def __init__(self, state_dim: int, bins: int = 20, decay: float = 0.99):
        self.bins, self.decay, self.updates = bins, decay, 0
        zeros = torch.zeros(state_dim)
        self.value = [zeros.clone(), zeros.clone()]  # mean, mean square
        self.delta = [zeros.clone(), zeros.clone()]
        self.low, self.high = torch.full((state_dim,), float("inf")), torch.full((state_dim,), float("-inf"))
        self.hist = torch.zeros(state_dim, bins)

    def _mix(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return new if self.updates == 0 else self.decay * old + (1 - self.decay) * new

    def update(self, states: torch.Tensor, filled: torch.Tensor) -> None:
        """One sampled batch: states (B, T+1, S), filled (B, T)."""
        slots = _slot_mask(filled)
        flat = states.reshape(-1, states.shape[-1])[slots.reshape(-1) > 0]
        self.low, self.high = torch.minimum(self.low, flat.min(0).values), torch.maximum(self.high, flat.max(0).values)
        value = _moments(states, slots)
        delta = _moments(states[:, 1:] - states[:, :-1], filled)
        counts = histograms(states, slots, self.low, self.high, self.bins)
        probs = counts / counts.sum(-1, keepdim=True).clamp_min(1e-12)
        self.value = [self._mix(o, n) for o, n in zip(self.value, value, strict=True)]
        self.delta = [self._mix(o, n) for o, n in zip(self.delta, delta, strict=True)]
        self.hist = self._mix(self.hist, probs)
        self.updates += 1

    def scores(self, criterion: str) -> tuple[torch.Tensor, torch.Tensor]:
        varying = (self.value[1] - self.value[0].square()) > CONSTANT
        if criterion == "cog":
            return self.delta[1], varying
        return entropy(self.hist), varying

    def state(self) -> dict:
        return {"value": self.value, "delta": self.delta, "low": self.low, "high": self.high, "hist": self.hist,
                "updates": self.updates}  # fmt: skip

    def load_state(self, state: dict) -> None:
        self.value, self.delta = list(state["value"]), list(state["delta"])
        self.low, self.high, self.hist, self.updates = state["low"], state["high"], state["hist"], state["updates"]


def select_focus(scores: torch.Tensor, varying: torch.Tensor, k: int) -> torch.Tensor:
    """The k varying dimensions of lowest score (ties: lower index first), sorted; fewer if fewer vary."""
    candidates = torch.nonzero(varying).flatten()
    order = torch.argsort(scores[candidates], stable=True)
    return candidates[order[:k]].sort().values
