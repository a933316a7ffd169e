"""One-step cooperative matrix games: relative overgeneralization in its purest form, and a shifting optimum.

Two agents pick one of three actions each and both receive payoff[a1, a2]; the episode ends after that one
step. Observations carry no information (a constant 1), the state is constant, every action is available.

- ``climbing`` (Claus & Boutilier 1998): [[11, −30, 0], [−30, 7, 6], [0, 0, 5]], optimum (0, 0) = 11; a
  monotonic decomposition is drawn to the safe (2, 2) = 5 or (1, 1) = 7.
- ``penalty`` (k = −100): [[k, 0, 10], [0, 2, 0], [10, 0, k]], optima (0, 2) and (2, 0) = 10.
- ``nonmonotonic`` (pymarl2's default one-step game, as S2Q's code): [[8, −12, −12], [−12, 0, 0], [−12, 0, 0]].
- ``shifting``: climbing for the first ``switch_episode`` training episodes, then
  [[5, 0, 0], [0, 7, −30], [0, −30, 11]]: the optimum moves from (0, 0) to (2, 2), again guarded by −30 traps,
  while the safe cell (1, 1) = 7 stays where it was (so a policy stuck there does not "recover" by accident, as
  it would if the matrix were simply reversed: the old safe cell (2, 2) = 5 would become the new optimum). The
  S2Q setting where the optimum shifts mid-run.
  Games built with one :class:`EpisodeClock` share the count: training games advance it at every reset, test
  games (``counts=False``) only read it, so greedy tests never move the switch.
"""

from __future__ import annotations

import numpy as np

from leantrain.errors import ConfigError
from leantrain.marl.env import EnvInfo, MultiAgentEnv, Observation, Step

CLIMBING = [[11, -30, 0], [-30, 7, 6], [0, 0, 5]]
SHIFTED = [[5, 0, 0], [0, 7, -30], [0, -30, 11]]  # the shifting game after its switch
PAYOFFS = {
    "climbing": CLIMBING,
    "penalty": [[-100, 0, 10], [0, 2, 0], [10, 0, -100]],
    "nonmonotonic": [[8, -12, -12], [-12, 0, 0], [-12, 0, 0]],
}


class EpisodeClock:
    """Training episodes started so far, shared by the games of one run."""

    def __init__(self):
        self.episodes = 0


class MatrixGame(MultiAgentEnv):
    """A one-step two-player cooperative game with a (3, 3) payoff matrix; ``after`` switches it mid-run."""

    def __init__(self, payoff, after=None, switch_episode: int | None = None, clock: EpisodeClock | None = None,
                 counts: bool = True):  # fmt: skip
        self.payoffs = [np.asarray(payoff, dtype=np.float32)]
        if after is not None:
            if switch_episode is None or switch_episode < 1:
                raise ConfigError("a shifting matrix game needs switch_episode >= 1")
            self.payoffs.append(np.asarray(after, dtype=np.float32))
        self.switch_episode = switch_episode
        rows, cols = self.payoffs[0].shape
        if rows != cols or any(p.shape != (rows, cols) for p in self.payoffs):
            raise ConfigError(
                f"matrix game payoffs must be square and of one shape, got {[p.shape for p in self.payoffs]}"
            )
        self.info = EnvInfo(n_agents=2, n_actions=rows, obs_dim=1, state_dim=1, episode_limit=1)
        self.clock, self.counts = clock or EpisodeClock(), counts
        self.switched = False  # whether the episode in progress uses the switched payoff

    @property
    def payoff(self) -> np.ndarray:
        """The payoff of the episode in progress."""
        return self.payoffs[-1] if self.switched else self.payoffs[0]

    def optimum(self) -> tuple[tuple[int, int], float]:
        """The best joint action of the current payoff and its value."""
        p = self.payoff
        i, j = np.unravel_index(int(np.argmax(p)), p.shape)
        return (int(i), int(j)), float(p[i, j])

    def _observation(self) -> Observation:
        n = self.info.n_actions
        return Observation(np.ones((2, 1), np.float32), np.ones(1, np.float32), np.ones((2, n), bool))

    def reset(self, seed: int | None = None) -> Observation:
        if self.counts:
            self.clock.episodes += 1
        self.switched = self.switch_episode is not None and self.clock.episodes > self.switch_episode
        return self._observation()

    def step(self, actions) -> Step:
        a = self.check_actions(actions, np.ones((2, self.info.n_actions), bool))
        return Step(self._observation(), float(self.payoff[a[0], a[1]]), True, False, {})


def make_matrix_game(
    name: str, switch_episode: int = 500, clock: EpisodeClock | None = None, counts: bool = True
) -> MatrixGame:
    if name == "shifting":
        return MatrixGame(CLIMBING, SHIFTED, switch_episode, clock, counts)
    if name not in PAYOFFS:
        raise ConfigError(f"unknown matrix game {name!r}; choose from {', '.join([*PAYOFFS, 'shifting'])}")
    return MatrixGame(PAYOFFS[name])
