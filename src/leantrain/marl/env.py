"""The one interface every cooperative multi-agent environment is adapted to.

A :class:`MultiAgentEnv` returns, at reset and after every step, an :class:`Observation`: per-agent
observations (N, obs_dim), the global state (state_dim,) and the available-action mask (N, n_actions); a step
takes one action per agent and returns the team reward and whether the episode ended (``terminated``: a real
end, no bootstrapping; ``truncated``: the time limit, bootstrap from the next state). This is the PyMARL
``MultiAgentEnv`` contract (obs, state, avail actions, team reward, episode limit) in a gymnasium-style shape,
so SMAC-like environments plug in unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EnvInfo:
    n_agents: int
    n_actions: int
    obs_dim: int
    state_dim: int
    episode_limit: int


@dataclass
class Observation:
    obs: np.ndarray  # (N, obs_dim) float32
    state: np.ndarray  # (state_dim,) float32
    avail: np.ndarray  # (N, n_actions) bool


@dataclass
class Step:
    observation: Observation
    reward: float
    terminated: bool
    truncated: bool
    info: dict


class MultiAgentEnv:
    """Base class: subclasses set ``info`` and implement :meth:`reset` and :meth:`step`."""

    info: EnvInfo

    def reset(self, seed: int | None = None) -> Observation:
        raise NotImplementedError

    def step(self, actions: np.ndarray) -> Step:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def check_actions(self, actions: np.ndarray, avail: np.ndarray) -> np.ndarray:
        """``actions`` as an int array (N,), refusing unavailable ones (a controller bug, never silently fixed)."""
        actions = np.asarray(actions, dtype=np.int64).reshape(-1)
        n, k = self.info.n_agents, self.info.n_actions
        chosen = actions.tolist()  # a plain loop: this runs at every environment step
        if len(chosen) != n or not all(0 <= a < k for a in chosen):
            raise ValueError(f"expected {n} actions in [0, {k}), got {chosen}")
        if not all(avail[i, a] for i, a in enumerate(chosen)):
            raise ValueError(f"actions {chosen} include unavailable ones (mask {avail.astype(int).tolist()})")
        return actions
