"""Multi-Destination Spread: the zero-shot-coordination task of SBC's CPU plan (self-written, not the paper's code).

SBC ("Shaping Zero-Shot Coordination via State Blocking", Kang, Lee, Jo, Han, arXiv 2605.11688) reports a
Multi-Destination Spread, an MPE-style task with several equally good ways to coordinate; its exact layout is
unknown. This grid version keeps what matters for zero-shot coordination: ``destinations`` (K, up to 4) equally
good conventions, so a self-play pair settles on an arbitrary one and two pairs trained apart agree only by chance
(about 1/K), while a partner that reads where its partner is heading can meet anyone.

    size 5:   x 0 1 2 3 4        0..3: the destinations, on the corners of a size x size grid (equally far
         y=0    0 . . . 2               from the centre: 2 (size // 2) moves); the first K of 0, 1, 2, 3 are used
         y=2    . . A . .        A:     both agents start on the centre cell, every episode (no randomness)
         y=4    3 . . . 1

Actions (5, always available): stay, up, down, left, right; a move off the grid is a stay; agents may share a
cell. The team reward is 1 at the first step where both agents stand on the same destination (the episode then
terminates), else 0; ``episode_limit`` steps otherwise (truncation). The return of an episode is its success.

Observation of each agent (4 + 2K), MPE-style (simple_spread's agents see relative positions): its own (x, y), its
partner's position relative to its own (dx, dy), then each destination's relative position, all divided by
size − 1. State (4): agent 0's (x, y), then agent 1's, in the same scale.

Interpretation: the spec's "K destination pairs" is read as K destinations each to be reached by the pair (both
agents); reaching one together is the only reward (sparse, as the spec's "reward if both go to the same
destination"). SBC's blockable units here are the destinations (:meth:`MultiDestinationSpread.blockable_units`).
"""

from __future__ import annotations

import numpy as np

from leantrain.errors import ConfigError
from leantrain.marl.door_world import MOVES  # the grid worlds' five moves: stay, up, down, left, right
from leantrain.marl.env import EnvInfo, MultiAgentEnv, Observation, Step


class MultiDestinationSpread(MultiAgentEnv):
    """Two agents, K equally good destinations, reward only when both reach the same one (module docstring)."""

    n_agents = 2
    noop_action = 0  # stay: what a hard-blocked move becomes (sbc_blocking.BlockedEnv)

    def __init__(self, size: int = 5, destinations: int = 4, episode_limit: int = 12):
        if isinstance(size, bool) or not isinstance(size, int) or size < 3 or size % 2 == 0:
            raise ConfigError(f"multi-destination size={size!r} must be an odd integer >= 3 (a centre cell)")
        if isinstance(destinations, bool) or not isinstance(destinations, int) or not 1 <= destinations <= 4:
            raise ConfigError(f"multi-destination destinations={destinations!r} must be an integer in 1..4")
        if isinstance(episode_limit, bool) or not isinstance(episode_limit, int) or episode_limit < 1:
            raise ConfigError(f"multi-destination episode_limit={episode_limit!r} must be an integer >= 1")
        last = size - 1
        corners = ((0, 0), (last, last), (last, 0), (0, last))  # opposite corners first: K = 2 stays symmetric
        self.size, self.destinations = size, corners[:destinations]
        self.centre = (size // 2, size // 2)
        obs_dim = 4 + 2 * destinations
        self.info = EnvInfo(n_agents=2, n_actions=5, obs_dim=obs_dim, state_dim=4, episode_limit=episode_limit)
        self.avail = np.ones((2, 5), bool)
        self.positions = [self.centre, self.centre]
        self.t = 0

    def _observation(self) -> Observation:
        pos = np.asarray(self.positions, np.float32) / (self.size - 1)  # (2, 2)
        dest = np.asarray(self.destinations, np.float32) / (self.size - 1)  # (K, 2)
        rows = [np.concatenate([pos[i], pos[1 - i] - pos[i], (dest - pos[i]).reshape(-1)]) for i in range(2)]
        obs = np.stack(rows)  # (2, 4 + 2K)
        return Observation(obs, pos.reshape(-1).copy(), self.avail.copy())

    def reset(self, seed: int | None = None) -> Observation:
        self.positions, self.t = [self.centre, self.centre], 0
        return self._observation()

    def target(self, position: tuple[int, int], action: int) -> tuple[int, int]:
        """Where ``action`` takes an agent at ``position`` (a move off the grid stays)."""
        x, y = position[0] + MOVES[action][0], position[1] + MOVES[action][1]
        return (x, y) if 0 <= x < self.size and 0 <= y < self.size else position

    def destination_at(self, position: tuple[int, int]) -> int | None:
        return self.destinations.index(position) if position in self.destinations else None

    def step(self, actions) -> Step:
        a = self.check_actions(actions, self.avail).tolist()
        self.positions = [self.target(p, k) for p, k in zip(self.positions, a, strict=True)]
        self.t += 1
        met = self.destination_at(self.positions[0]) if self.positions[0] == self.positions[1] else None
        done = met is not None
        truncated = not done and self.t >= self.info.episode_limit
        return Step(self._observation(), float(done), done, truncated, {"destination": -1 if met is None else met})

    # ------------------------------------------------------------ SBC's blockable units: the destinations

    def blockable_units(self) -> tuple[tuple, ...]:
        return tuple(("destination", k) for k in range(len(self.destinations)))

    def _units(self, position) -> frozenset:
        k = self.destination_at(position)
        return frozenset() if k is None else frozenset({("destination", k)})

    def occupied_units(self) -> list[frozenset]:
        """Per agent, the destination it stands on now (if any)."""
        return [self._units(p) for p in self.positions]

    def action_units(self, actions) -> list[frozenset]:
        """Per agent, the destination its action would move it onto from the current state (if any)."""
        return [self._units(self.target(p, int(k))) if int(k) else frozenset()
                for p, k in zip(self.positions, actions, strict=True)]  # fmt: skip
