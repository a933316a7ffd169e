"""The door/switch gridworld of FIM's CPU plan (a Pass / Secret-room style task; self-written, not from the paper).

FIM ("Center of Gravity-Guided Focusing Influence Mechanism for Multi-Agent Reinforcement Learning", Park, Lee, Han,
arXiv 2506.19417) targets sparse-reward tasks whose reward is unlocked by a state variable that rarely changes. This
world has exactly one: the door.

    x:   0 1 2 | 3 | 4 5 6        (width 7, height 5; the wall column is x = width // 2)
    y=0  P . . | # | . . .        P: pressure plates at (0, 0) and (0, height - 1)
    y=2  . . . | D | . . G        D: the door at (width // 2, height // 2), G: the goal at (width - 1, height // 2)
    y=4  P . . | # | . . .

Two agents start at random cells of the left room (from the reset seed; never on a plate). Actions: stay, up, down,
left, right (always available; a move into the border, the wall or the closed door is a stay). After the agents
move, the door opens if both plates are occupied (one agent on each) and then stays open for the rest of the
episode: the door flag changes at most once per episode. The team reward is 1 when an agent stands on the goal
(the episode then terminates), else 0; ``episode_limit`` (50) steps otherwise (truncation).

Observation of each agent (5): its own (x, y), the other agent's (x, y), the door flag; coordinates divided by
(width − 1, height − 1). State (5): both agents' (x, y) in the same scale, then the door flag at index
:attr:`DoorWorld.door_dim` (4) — the explicit dimension FIM's focus set should find.

Interpretation (the plan says the flag "flips only while both plates are occupied"): the door *latches* open. A door
that is open only while both plates are held could never be passed by either agent (both are on the plates), and
a door that toggles each time both plates are reached would make the task depend on the parity of visits.
"""

from __future__ import annotations

import numpy as np

from leantrain.errors import ConfigError
from leantrain.marl.env import EnvInfo, MultiAgentEnv, Observation, Step

MOVES = ((0, 0), (0, -1), (0, 1), (-1, 0), (1, 0))  # stay, up, down, left, right as (dx, dy)


class DoorWorld(MultiAgentEnv):
    """Two agents, two pressure plates, a latching door and a goal behind it (see the module docstring)."""

    n_agents = 2
    door_dim = 4  # index of the door flag in the state

    def __init__(self, width: int = 7, height: int = 5, episode_limit: int = 50):
        if not isinstance(width, int) or width < 5 or width % 2 == 0:
            raise ConfigError(f"door world width={width!r} must be an odd integer >= 5 (a room on each side)")
        if not isinstance(height, int) or height < 3:
            raise ConfigError(f"door world height={height!r} must be an integer >= 3")
        if not isinstance(episode_limit, int) or episode_limit < 1:
            raise ConfigError(f"door world episode_limit={episode_limit!r} must be an integer >= 1")
        self.width, self.height = width, height
        self.wall_x, self.door = width // 2, (width // 2, height // 2)
        self.plates = ((0, 0), (0, height - 1))
        self.goal = (width - 1, height // 2)
        self.info = EnvInfo(n_agents=2, n_actions=5, obs_dim=5, state_dim=5, episode_limit=episode_limit)
        self.starts = [(x, y) for x in range(self.wall_x) for y in range(height) if (x, y) not in self.plates]
        self.scale = np.array([width - 1, height - 1], np.float32)
        self.avail = np.ones((2, 5), bool)
        self.positions = [self.starts[0], self.starts[0]]
        self.door_open, self.t = False, 0

    def _observation(self) -> Observation:
        pos = np.asarray(self.positions, np.float32) / self.scale  # (2, 2)
        door = np.float32(self.door_open)
        state = np.array([*pos[0], *pos[1], door], np.float32)
        obs = np.stack([np.array([*pos[i], *pos[1 - i], door], np.float32) for i in range(2)])
        return Observation(obs, state, self.avail.copy())

    def reset(self, seed: int | None = None) -> Observation:
        rng = np.random.default_rng(seed)
        self.positions = [self.starts[int(k)] for k in rng.integers(len(self.starts), size=2)]
        self.door_open, self.t = False, 0
        return self._observation()

    def passable(self, x: int, y: int) -> bool:
        if not (0 <= x < self.width and 0 <= y < self.height):
            return False
        return x != self.wall_x or (self.door_open and (x, y) == self.door)

    def step(self, actions) -> Step:
        a = self.check_actions(actions, self.avail)
        moved = []
        for (x, y), k in zip(self.positions, a.tolist(), strict=True):
            nx, ny = x + MOVES[k][0], y + MOVES[k][1]
            moved.append((nx, ny) if self.passable(nx, ny) else (x, y))
        self.positions = moved
        if not self.door_open and all(p in self.positions for p in self.plates):
            self.door_open = True
        self.t += 1
        reached = self.goal in self.positions
        truncated = not reached and self.t >= self.info.episode_limit
        return Step(self._observation(), float(reached), reached, truncated, {"door_open": self.door_open})
