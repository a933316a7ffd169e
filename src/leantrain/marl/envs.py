"""Environments of the ``marl.env`` config field, registered by kind: ``<kind>:<name>``.

- ``matrix:<game>`` (climbing, penalty, nonmonotonic, shifting; :mod:`leantrain.marl.matrix_games`),
- ``lbf:<gymnasium id>`` and ``rware:<gymnasium id>`` (:class:`~leantrain.marl.gym_adapters.GymnasiumMultiAgent`),
- ``mpe:simple_spread`` and ``mpe:simple_tag`` (mpe2; predator-prey with learning predators and a scripted prey);
  ``mpe:simple_spread`` with ``sparse_radius`` set is a sparse-reward task (:class:`SparseCoverage`: team reward 1
  and the episode ends at the first step where every landmark has an agent within the radius, else 0; FoX's task),
- ``vmas:<scenario>`` (VMAS's torch-vectorised scenarios with discrete actions),
- ``grid:door`` (:class:`~leantrain.marl.door_world.DoorWorld`: two agents, two plates, a latching door, a sparse
  goal behind it; FIM's task; ``env_args`` ``width``, ``height``, ``episode_limit``),
- ``grid:multi_destination`` (:class:`~leantrain.marl.multi_destination.MultiDestinationSpread`: two agents, K
  equally good destinations, reward only when both reach the same one; SBC's task; ``env_args`` ``size``,
  ``destinations``, ``episode_limit``),
- ``blocked:<kind>:<name>`` (:class:`~leantrain.marl.sbc_blocking.BlockedEnv`: SBC's virtual environment, the
  environment ``<kind>:<name>`` with a blocking set; ``env_args`` ``blocked_units`` (a list of units, e.g.
  ``[[destination, 1]]``), ``block_mode`` (penalty, hard), ``block_penalty`` (c), the rest for the environment),
- ``overcooked:<layout>`` (:class:`~leantrain.marl.overcooked_env.OvercookedMultiAgent`: two cooks on cramped_room,
  asymmetric_advantages, coordination_ring, forced_coordination or counter_circuit; ``env_args``
  ``episode_limit`` (400), ``shaped_reward`` (0.0), ``old_dynamics``, ``random_start``, ``counter_features``).

``marl.env_args`` are passed to the builder as keyword arguments (an LBF step limit ``max_episode_steps``, the
number of predators ``n_predators``, ...). Register another kind with :func:`register_env`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

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


class SparseCoverage(MultiAgentEnv):
    """A sparse ``simple_spread``: reward 1 and the end of the episode (terminated) at the first step where every
    landmark has an agent within ``radius`` (positions from the mpe2 world), else reward 0; the return of an episode
    is its success. The observations, state and actions are simple_spread's."""

    def __init__(self, env: MultiAgentEnv, radius: float):
        if not radius > 0:
            raise ConfigError(f"marl.env_args sparse_radius={radius!r} must be > 0")
        self.env, self.radius, self.info = env, float(radius), env.info

    def covered(self) -> bool:
        """Every landmark has an agent within the radius."""
        world = self.env.env.unwrapped.world
        agents = np.stack([a.state.p_pos for a in world.agents])  # (N, 2)
        landmarks = np.stack([lm.state.p_pos for lm in world.landmarks])  # (L, 2)
        gaps = np.sqrt(((landmarks[:, None] - agents[None]) ** 2).sum(-1))  # (L, N)
        return bool((gaps.min(1) <= self.radius).all())

    def reset(self, seed=None):
        return self.env.reset(seed)

    def step(self, actions):
        step = self.env.step(actions)
        done = self.covered()
        step.reward, step.terminated, step.truncated = float(done), done, step.truncated and not done
        return step

    def close(self) -> None:
        self.env.close()


@register_env("mpe")
def _mpe(name, switch_episode, clock, counts, **env_args):
    from leantrain.marl.gym_adapters import PredatorPrey, SimpleSpread

    scenarios = {"simple_spread": SimpleSpread, "simple_tag": PredatorPrey}
    if name not in scenarios:
        raise ConfigError(f"unknown mpe scenario {name!r}; choose from {', '.join(scenarios)}")
    radius = env_args.pop("sparse_radius", None) if name == "simple_spread" else None
    try:
        env = scenarios[name](**env_args)
    except TypeError as err:
        raise ConfigError(f"marl.env_args for mpe:{name}: {err}") from None
    return env if radius is None else SparseCoverage(env, radius)


@register_env("vmas")
def _vmas(name, switch_episode, clock, counts, **env_args):
    from leantrain.marl.vmas_adapter import VmasMultiAgent

    return VmasMultiAgent(name, **env_args)


@register_env("grid")
def _grid(name, switch_episode, clock, counts, **env_args):
    from leantrain.marl.door_world import DoorWorld
    from leantrain.marl.multi_destination import MultiDestinationSpread

    worlds = {"door": DoorWorld, "multi_destination": MultiDestinationSpread}
    if name not in worlds:
        raise ConfigError(f"unknown grid world {name!r}; choose from: {', '.join(worlds)}")
    try:
        return worlds[name](**env_args)
    except TypeError as err:
        raise ConfigError(f"marl.env_args for grid:{name}: {err}") from None


@register_env("blocked")
def _blocked(name, switch_episode, clock, counts, blocked_units=(), block_mode="penalty", block_penalty=1.0,
             **env_args):  # fmt: skip
    """SBC's virtual environment: ``blocked:<kind>:<name>`` is ``<kind>:<name>`` behind a blocking set."""
    from leantrain.marl.sbc_blocking import BlockedEnv

    env = make_env(name, switch_episode, clock, counts, **env_args)
    return BlockedEnv(env, [tuple(u) for u in blocked_units], block_mode, block_penalty)


@register_env("overcooked")
def _overcooked(name, switch_episode, clock, counts, **env_args):
    from leantrain.marl.overcooked_env import OvercookedMultiAgent

    try:
        return OvercookedMultiAgent(name, **env_args)
    except TypeError as err:
        raise ConfigError(f"marl.env_args for overcooked:{name}: {err}") from None


def make_env(name: str, switch_episode: int = 500, clock=None, counts: bool = True, **env_args) -> MultiAgentEnv:
    """An environment by name; ``clock`` / ``counts`` share the shifting game's episode count (test copies read it)."""
    kind, _, rest = name.partition(":")
    if kind not in ENVIRONMENTS:
        raise ConfigError(
            f"unknown environment {name!r}; use matrix:climbing|penalty|nonmonotonic|shifting, "
            "lbf:Foraging-8x8-2p-2f-coop-v3 (any lbforaging id), rware:rware-tiny-2ag-v2, mpe:simple_spread, "
            "mpe:simple_tag, vmas:<scenario>, grid:door, grid:multi_destination, overcooked:<layout> or "
            "blocked:<kind>:<name>"
        )
    return ENVIRONMENTS[kind](rest, switch_episode, clock, counts, **env_args)
