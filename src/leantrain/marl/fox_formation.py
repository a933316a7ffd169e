"""Formations of FoX ("FoX: Formation-aware Exploration in Multi-Agent Reinforcement Learning", Jo et al., AAAI 2024,
arXiv 2308.11272): the formation key of a step and its count-based visit bonus.

Many joint states are the same up to the agents' relative arrangement, so FoX counts *formations* instead of states.
As the official runner, the formation is computed from the agents' observation vectors (positions are not assumed):
for every agent i, the Euclidean distances ||o^i − o^j|| rounded to ``round_decimals``, its farthest and its nearest
other agent, and a SimHash of the two difference vectors o^i − o^far and o^i − o^near (sign bits of a fixed random
projection with ``hash_bits`` = 9 rows, read as an integer). The formation is the tuple over agents of
(d_far, d_near, hash_far, hash_near), 4N numbers. :class:`FormationCounter` (a runner step hook, training episodes
only) counts N(F) and records, per step, the formation reached, its count and the far/near agents;
:func:`visit_bonus` turns counts into FoX's r^visit = 1/sqrt(N(F)) shifted by its batch maximum (so r^visit <= 0).

Departures from the official runner, all documented in :mod:`leantrain.marl.fox`:

- ties between other agents at the same rounded distance are broken by the unrounded distance and then the hash
  (the official ``argmax``/``argmin`` take the lowest index), and the farthest agent is searched among the *other*
  agents (the official ``argmax`` also sees the agent itself at distance 0): the key is then invariant to the order
  of the other agents (tested);
- the formation recorded at step t is the one *reached* (computed from the observations after the step), counted
  when reached: the official learner reads slot t+1's formation and count for the reward of step t, which we record
  at step t directly, so the last step of an episode has its formation too (the official one reads an empty slot).
"""

from __future__ import annotations

import numpy as np
import torch

from leantrain.errors import ConfigError


def formation_projection(obs_dim: int, bits: int = 9, kind: str = "uniform", seed: int = 0) -> np.ndarray:
    """The fixed SimHash projection (bits, obs_dim): uniform [0, 1) as the official ``np.random.rand`` or Gaussian
    (the usual SimHash)."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.random((bits, obs_dim))
    if kind == "gaussian":
        return rng.standard_normal((bits, obs_dim))
    raise ConfigError(f"FoX projection={kind!r} must be 'uniform' or 'gaussian'")


def simhash(diff: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Sign bits of ``projection @ diff`` read as an integer, first row most significant: (..., O) -> (...)."""
    bits = (diff @ projection.T > 0).astype(np.int64)  # (..., bits)
    weights = 1 << np.arange(projection.shape[0] - 1, -1, -1)
    return bits @ weights


def formation_key(obs: np.ndarray, projection: np.ndarray, decimals: int = 1):
    """The formation of one joint observation ``obs`` (N, O).

    Returns (features (4N,) float64: per agent (d_far, d_near, hash_far, hash_near), far (N,), near (N,) indices)."""
    n = obs.shape[0]
    diff = obs[:, None, :] - obs[None, :, :]  # (N, N, O): o^i - o^j
    raw = np.sqrt(np.square(diff).sum(-1))  # (N, N)
    dist = np.round(raw, decimals)
    codes = simhash(diff, projection)  # (N, N)
    features = np.zeros((n, 4))
    far, near = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for i in range(n):
        others = [j for j in range(n) if j != i] or [i]
        # content order (rounded distance, exact distance, hash): no dependence on the other agents' indices
        ranked = sorted(others, key=lambda j: (dist[i, j], raw[i, j], codes[i, j]))
        near[i], far[i] = ranked[0], ranked[-1]
        features[i] = dist[i, far[i]], dist[i, near[i]], codes[i, far[i]], codes[i, near[i]]
    return features.reshape(-1), far, near


class FormationCounter:
    """Runner step hook counting N(F) over training steps and recording per step (``step_fox_*`` fields):
    ``fox_formation`` (4N) the formation reached, ``fox_visit`` (1) its count after this visit, ``fox_far`` and
    ``fox_near`` (N) each agent's farthest and nearest other agent."""

    def __init__(self, n_agents: int, obs_dim: int, decimals: int = 1, bits: int = 9, projection: str = "uniform",
                 seed: int = 0):  # fmt: skip
        self.decimals = decimals
        self.projection = formation_projection(obs_dim, bits, projection, seed)
        self.counts: dict[tuple, int] = {}
        self.fields = {"fox_formation": (4 * n_agents,), "fox_visit": (1,), "fox_far": (n_agents,),
                       "fox_near": (n_agents,)}  # fmt: skip
        self.runner = None

    def attach(self, runner) -> None:
        """Count the formations of ``runner``'s training episodes and record them in its batches."""
        self.runner = runner
        runner.step_hooks.append(self)
        runner.step_fields.update(self.fields)

    def key(self, obs: np.ndarray):
        return formation_key(obs, self.projection, self.decimals)

    def visit(self, obs: np.ndarray) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
        """Count the formation of ``obs`` (N, O) once; (features, its count now, far, near)."""
        features, far, near = self.key(obs)
        key = tuple(features.tolist())
        self.counts[key] = self.counts.get(key, 0) + 1
        return features, self.counts[key], far, near

    def __call__(self, t: int, transition: dict) -> None:
        next_obs, active = transition["next_obs"], transition["active"]
        e = next_obs.shape[0]
        out = {name: np.zeros((e, *shape)) for name, shape in self.fields.items()}
        for i in np.flatnonzero(active):
            features, count, far, near = self.visit(next_obs[i])
            out["fox_formation"][i], out["fox_visit"][i], out["fox_far"][i], out["fox_near"][i] = (
                features, count, far, near)  # fmt: skip
        for name, values in out.items():
            self.runner.record(name, values)

    # a resumable run keeps the table (tuple keys are stored as lists)
    def state(self) -> dict:
        return {"keys": [list(k) for k in self.counts], "counts": list(self.counts.values())}

    def load_state(self, state: dict) -> None:
        self.counts = {tuple(k): int(c) for k, c in zip(state["keys"], state["counts"], strict=True)}


def visit_bonus(visits: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """FoX's r^visit before beta1: 1/sqrt(N(F)) minus its maximum over the batch's real steps (so <= 0); padded
    steps (and steps without a count) get 0 before the shift, as the official learner. visits, filled (B, T)."""
    raw = torch.where(visits > 0, visits.clamp_min(1).rsqrt(), torch.zeros_like(visits))
    real = filled > 0
    top = raw[real].max() if real.any() else raw.new_zeros(())
    return raw - top
