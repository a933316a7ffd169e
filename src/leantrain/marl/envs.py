"""Environment names of the ``marl.env`` config field: ``matrix:<game>``, ``lbf:<gymnasium id>``,
``rware:<gymnasium id>``, ``mpe:simple_spread``."""

from __future__ import annotations

from leantrain.errors import ConfigError
from leantrain.marl.env import MultiAgentEnv


def make_env(name: str, switch_episode: int = 500, clock=None, counts: bool = True) -> MultiAgentEnv:
    """An environment by name; ``clock`` / ``counts`` share the shifting game's episode count (test copies read it)."""
    kind, _, rest = name.partition(":")
    if kind == "matrix":
        from leantrain.marl.matrix_games import make_matrix_game

        return make_matrix_game(rest, switch_episode, clock, counts)
    if kind in ("lbf", "rware"):
        from leantrain.marl.gym_adapters import GymnasiumMultiAgent

        return GymnasiumMultiAgent(rest)
    if kind == "mpe" and rest == "simple_spread":
        from leantrain.marl.gym_adapters import SimpleSpread

        return SimpleSpread()
    raise ConfigError(
        f"unknown environment {name!r}; use matrix:climbing|penalty|nonmonotonic|shifting, "
        "lbf:Foraging-8x8-2p-2f-coop-v3 (any lbforaging id), rware:rware-tiny-2ag-v2 or mpe:simple_spread"
    )
