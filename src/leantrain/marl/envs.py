"""Environments of the ``marl.env`` config field, registered by kind: ``<kind>:<name>``.

- ``matrix:<game>`` (climbing, penalty, nonmonotonic, shifting; :mod:`leantrain.marl.matrix_games`),
- ``lbf:<gymnasium id>`` and ``rware:<gymnasium id>`` (:class:`~leantrain.marl.gym_adapters.GymnasiumMultiAgent`),
- ``mpe:simple_spread`` and ``mpe:simple_tag`` (mpe2; predator-prey with learning predators and a scripted prey),
- ``vmas:<scenario>`` (VMAS's torch-vectorised scenarios with discrete actions).

``marl.env_args`` are passed to the builder as keyword arguments (an LBF step limit ``max_episode_steps``, the
number of predators ``n_predators``, ...). Register another kind with :func:`register_env`.
"""

from __future__ import annotations

from collections.abc import Callable

from leantrain.errors import ConfigError
from leantrain.marl.env import MultiAgentEnv
from leantrain.registry import Registry

EnvBuilder = Callable[..., MultiAgentEnv]  # (name, switch_episode, clock, counts, **env_args) -> env
ENVIRONMENTS: Registry[EnvBuilder] = Registry("MARL environment kind")
register_env = ENVIRONMENTS.register


def _no_args(kind: str, env_args: dict) -> None:
    if env_args:
        raise ConfigError(f"marl.env_args {sorted(env_args)} do not apply to {kind} environments")


@register_env("matrix")
def _matrix(name, switch_episode, clock, counts, **env_args):
    from leantrain.marl.matrix_games import make_matrix_game

    _no_args("matrix", env_args)
    return make_matrix_game(name, switch_episode, clock, counts)


@register_env("lbf")
@register_env("rware")
def _gymnasium(name, switch_episode, clock, counts, **env_args):
    from leantrain.marl.gym_adapters import GymnasiumMultiAgent

    return GymnasiumMultiAgent(name, **env_args)


@register_env("mpe")
def _mpe(name, switch_episode, clock, counts, **env_args):
    from leantrain.marl.gym_adapters import PredatorPrey, SimpleSpread

    scenarios = {"simple_spread": SimpleSpread, "simple_tag": PredatorPrey}
    if name not in scenarios:
        raise ConfigError(f"unknown mpe scenario {name!r}; choose from {', '.join(scenarios)}")
    try:
        return scenarios[name](**env_args)
    except TypeError as err:
        raise ConfigError(f"marl.env_args for mpe:{name}: {err}") from None


@register_env("vmas")
def _vmas(name, switch_episode, clock, counts, **env_args):
    from leantrain.marl.vmas_adapter import VmasMultiAgent

    return VmasMultiAgent(name, **env_args)


def make_env(name: str, switch_episode: int = 500, clock=None, counts: bool = True, **env_args) -> MultiAgentEnv:
    """An environment by name; ``clock`` / ``counts`` share the shifting game's episode count (test copies read it)."""
    kind, _, rest = name.partition(":")
    if kind not in ENVIRONMENTS:
        raise ConfigError(
            f"unknown environment {name!r}; use matrix:climbing|penalty|nonmonotonic|shifting, "
            "lbf:Foraging-8x8-2p-2f-coop-v3 (any lbforaging id), rware:rware-tiny-2ag-v2, mpe:simple_spread, "
            "mpe:simple_tag or vmas:<scenario>"
        )
    return ENVIRONMENTS[kind](rest, switch_episode, clock, counts, **env_args)
