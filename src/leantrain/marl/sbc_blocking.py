"""SBC's state blocking: a virtual environment per blocking set, and the sampler of blocking sets.

Kang, Lee, Jo, Han, "Shaping Zero-Shot Coordination via State Blocking" (SBC, arXiv 2605.11688; no official code).
SBC trains each partner of its population in a *virtual* environment where a designated set B of states is blocked,
so the partner settles on another, locally optimal convention; the real environment is never changed. What is
blocked, how the sets are drawn and whether blocking is a penalty or a hard wall are not known from the paper; the
reference interpretation here (the spec's, ``shared/specs/marl.md`` §6):

- **Units.** A state is "in B" when an agent occupies or uses a blocked *unit*. An environment that supports
  blocking names its units and says which an agent is in (duck-typed, no base class needed):
  ``blockable_units()`` (every unit, hashable tuples such as ``("destination", 2)`` or ``("pot", 2, 0)``),
  ``occupied_units()`` (per agent, the units it occupies or used in the step just taken), ``action_units(actions)``
  (per agent, the units its action would enter or use from the current state) and ``noop_action``.
  :class:`~leantrain.marl.multi_destination.MultiDestinationSpread`: the destinations;
  :class:`~leantrain.marl.overcooked_env.OvercookedMultiAgent`: floor cells and interactable tiles.
- **Penalty mode** (default): the partner's team reward is r − c·1[s' ∈ B], with s' the state after the step (one
  penalty per step, however many agents are in B); terminations, observations and availability are the real
  environment's. ``Step.info`` carries the real reward (``real_reward``) and the indicator (``blocked``).
- **Hard mode**: an action that would enter or use a blocked unit is replaced by the environment's no-op (stay)
  before the real step; nothing is subtracted. An agent that starts on a blocked unit may stay there.
- **Sets** (:func:`sample_blocking_sets`): the empty set first (a self-play-optimal partner, the spec's step 2),
  then distinct sets of ``size`` units drawn uniformly without replacement; ``size`` 0 gives a population of
  unblocked partners that differ only in their seeds (an FCP-style population, the ablation without blocking).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from leantrain.errors import ConfigError
from leantrain.marl.env import MultiAgentEnv, Step

BLOCK_MODES = ("penalty", "hard")
BLOCKING_API = ("blockable_units", "occupied_units", "action_units", "noop_action")


def blockable_units(env: MultiAgentEnv) -> tuple[tuple, ...]:
    """The environment's blockable units; a ConfigError if it has none (it does not implement the blocking API)."""
    missing = [name for name in BLOCKING_API if not hasattr(env, name)]
    if missing:
        raise ConfigError(f"{type(env).__name__} has no blockable units for SBC (it lacks {', '.join(missing)}); "
                          "use grid:multi_destination or overcooked:<layout>")  # fmt: skip
    return tuple(env.blockable_units())


class BlockedEnv(MultiAgentEnv):
    """``env`` behind the blocking set ``units``: the partner's virtual environment (see the module docstring)."""

    def __init__(self, env: MultiAgentEnv, units, mode: str = "penalty", penalty: float = 1.0):
        known = blockable_units(env)
        units = frozenset(tuple(u) for u in units)
        unknown = sorted(units - set(known), key=str)
        if unknown:
            raise ConfigError(f"blocked_units {unknown} are not units of {type(env).__name__}; its units are "
                              f"{[list(u) for u in known]}")  # fmt: skip
        if mode not in BLOCK_MODES:
            raise ConfigError(f"block_mode={mode!r} must be one of {', '.join(BLOCK_MODES)}")
        if isinstance(penalty, bool) or not isinstance(penalty, int | float) or not penalty >= 0:
            raise ConfigError(f"block_penalty={penalty!r} must be a number >= 0 (c in r - c * 1[s in B])")
        self.env, self.units, self.mode, self.penalty = env, units, mode, float(penalty)
        self.info = env.info

    def reset(self, seed: int | None = None):
        return self.env.reset(seed)

    def step(self, actions) -> Step:
        actions = np.asarray(actions, dtype=np.int64).reshape(-1)
        if self.mode == "hard" and self.units:
            entered = self.env.action_units(actions)
            actions = np.array([self.env.noop_action if units & self.units else a
                                for a, units in zip(actions.tolist(), entered, strict=True)])  # fmt: skip
        step = self.env.step(actions)
        blocked = bool(self.units) and any(units & self.units for units in self.env.occupied_units())
        info = {**step.info, "real_reward": step.reward, "blocked": blocked}
        reward = step.reward - self.penalty if self.mode == "penalty" and blocked else step.reward
        return Step(step.observation, reward, step.terminated, step.truncated, info)

    def close(self) -> None:
        self.env.close()

    def __getattr__(self, name):  # the real environment's state for scripted partners (Overcooked's mdp, state)
        if name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)


def sample_blocking_sets(units, count: int, size: int, seed: int = 0, include_empty: bool = True) -> list[frozenset]:
    """``count`` blocking sets over ``units``: the empty set first (``include_empty``), then distinct sets of
    ``size`` units drawn uniformly without replacement (``size`` 0: every set empty, an unblocked population).

    A ConfigError if there are fewer distinct sets of that size than asked for."""
    units = list(dict.fromkeys(tuple(u) for u in units))  # order kept: the draw depends only on the seed
    if count < 1:
        raise ConfigError(f"SBC population={count!r} must be >= 1")
    if size == 0:
        return [frozenset()] * count
    if not 0 < size <= len(units):
        raise ConfigError(f"SBC units_per_set={size!r} must be in 0..{len(units)} (the environment's units)")
    wanted = count - int(include_empty)
    available = math.comb(len(units), size)
    if wanted > available:
        raise ConfigError(f"SBC population={count} needs {wanted} distinct blocking sets of {size} units, but "
                          f"{len(units)} units give only {available}; lower the population or the set "
                          "size")  # fmt: skip
    rng = np.random.default_rng(seed)
    if available <= 100_000:
        pool = list(itertools.combinations(range(len(units)), size))
        chosen = [pool[i] for i in rng.choice(len(pool), wanted, replace=False)]
    else:  # too many to list: draw sets until enough distinct ones
        seen: dict[tuple, None] = {}
        while len(seen) < wanted:
            seen[tuple(sorted(rng.choice(len(units), size, replace=False).tolist()))] = None
        chosen = list(seen)
    sets = [frozenset(units[i] for i in combo) for combo in chosen]
    return [frozenset()] * include_empty + sets
