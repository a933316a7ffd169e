"""Overcooked-AI (Carroll et al., "On the Utility of Learning about Humans for Human-AI Coordination", NeurIPS 2019,
arXiv 1910.05789) as a :class:`~leantrain.marl.env.MultiAgentEnv`, on the ``overcooked`` package 0.2.1 (a numpy-2 fork
of HumanCompatibleAI/overcooked_ai; extras ``[overcooked]``, installed by ``make install``).

``overcooked:<layout>`` builds two cooks on one of the five layouts of the zero-shot-coordination literature:
``cramped_room``, ``asymmetric_advantages``, ``coordination_ring``, ``forced_coordination`` and ``counter_circuit``.
Soups take three onions, cook for 20 steps and are worth 20 when served; nothing else is worth anything.

- **Agents.** Agent 0 is the cook marked ``1`` in the layout grid, agent 1 the cook marked ``2``; both start at
  their marked cells facing north, holding nothing, every episode (``random_start=True``: both start on distinct
  free cells drawn from the reset seed instead). Nothing else is random: the dynamics are deterministic.
- **Actions** (6, always all available): 0 north, 1 south, 2 east, 3 west, 4 stay, 5 interact (pick up, put down,
  put an onion in a pot, take soup out with a dish, serve). A move into a counter turns the cook to face it; two cooks
  moving into the same cell, or through each other, both stay.
- **Observation** of each agent (96, float32): the package's ``featurize_state`` encoding (the 96-dimensional
  "featurized" state of overcooked_ai and human_aware_rl, two pots): the agent's own 46 features, the partner's 46
  in the same layout, the partner's position relative to the agent (2) and the agent's absolute (x, y) (2). The 46:
  facing (4, one-hot N/S/E/W), held object (4, one-hot onion/soup/dish/tomato), (dx, dy) to the closest onion, tomato,
  dish, soup, serving spot and empty counter (12, with the number of onions and tomatoes in that closest soup, 2,
  after the soup's pair), then for each of the two closest pots: exists, empty, full, cooking, ready, onions,
  tomatoes, cook steps left, (dx, dy) (2 x 10), then a wall or counter on each side N/S/E/W (4). Raw integer counts
  and grid offsets, not normalised (as in the reference code). Unreachable or absent objects read (0, 0).
- **State** (192): the two observations concatenated, agent 0 first.
- **Reward**: the team's delivery reward (20 a soup, summed over both cooks) plus ``shaped_reward`` (0.0 by default)
  times the package's shaped reward (3 for an onion put in a pot, 3 for a useful dish pick-up, 5 for taking soup out
  of a pot, summed over both cooks), the annealed shaping of Carroll et al.'s PPO. ``Step.info`` carries the raw
  ``sparse_reward``, ``shaped_reward`` and the number of ``soups`` served at that step.
- **Episode**: a fixed horizon, ``episode_limit`` (400, as in Carroll et al. and the ZSC literature) steps; Overcooked
  has no terminal state, so every episode ends by truncation.

Departures, interpretations and package problems (see docs/overcooked.md for how they were found):

- ``old_dynamics=True`` (default): a pot starts cooking by itself when its third onion goes in, as in Carroll et al.
  2019 and most ZSC work. The package defaults to overcooked_ai's newer rule (``old_dynamics=False``: a cook must
  interact with the filled pot, empty-handed, to start it, and may cook a pot of one or two onions, a soup worth 0).
- ``counter_circuit`` is the package's ``counter_circuit_o_1order`` (the onion-only layout of Carroll et al.'s
  ``random3``); the package's own ``counter_circuit`` is a tomato-and-onion variant with bonus orders.
- The package's ``featurize_state`` does not run as shipped: it calls ``MotionPlanner.min_cost_to_feature(...,
  with_argmin=True)``, an argument that fork dropped, and the fork's version returns the *first* candidate (or fails
  on an empty list) where none is reachable. :class:`FeatureDistances` restores overcooked_ai's query (the
  reachable candidate with the fewest steps, else none), so the encoding is the reference one.
- Distances come from a ``MotionPlanner`` built here; the package's own planner loaders read and write pickles
  inside site-packages, which this adapter never calls. Objects on counters are not targets of overcooked_ai's
  standard planner (``NO_COUNTERS_PARAMS``), so an onion, dish or soup put on a counter, and the closest empty
  counter, never enter the features; ``counter_features=True`` lets them in (useful where cooks hand items over a
  counter, as on ``forced_coordination``).

A scripted partner can read :attr:`OvercookedMultiAgent.state` (the package's ``OvercookedState``), ``mdp`` and
``planner``; :class:`~leantrain.marl.overcooked_scripted.GreedyCook` is one.

SBC's blockable units (:mod:`leantrain.marl.sbc_blocking`; our interpretation, the paper names "specific tiles or
interactable objects" only): every floor cell ``("cell", x, y)`` a cook can stand on, and every interactable tile
``(<kind>, x, y)`` with kind ``pot``, ``onion``, ``tomato``, ``dish`` (dispensers), ``serve`` or ``counter``. A cook
occupies the cell it stands on, and the tile it interacted with in the step just taken; a move enters the floor
cell it targets, an interact uses the tile the cook faces.
"""

from __future__ import annotations

import itertools

import numpy as np

from leantrain.errors import ConfigError, MissingDependencyError
from leantrain.marl.env import EnvInfo, MultiAgentEnv, Observation, Step

# overcooked declares pygame (which would overwrite mpe2's pygame-ce, the same module) and opencv-python; both are
# only used for rendering, so the package goes in without its declared dependencies (as `make install` does).
OVERCOOKED_INSTALL = (
    "make install, or: pip install -c constraints.txt --no-deps overcooked multi-agent-rlenv deprecated wrapt "
    "opencv-python-headless (and pygame-ce, from the marl extras)"
)

# our name -> the package's layout file
LAYOUTS = {
    "cramped_room": "cramped_room",
    "asymmetric_advantages": "asymmetric_advantages",
    "coordination_ring": "coordination_ring",
    "forced_coordination": "forced_coordination",
    "counter_circuit": "counter_circuit_o_1order",
}
N_ACTIONS = 6  # the package's Action.ALL_ACTIONS: north, south, east, west, stay, interact
STAY, INTERACT = 4, 5
DIRECTIONS = ((0, -1), (0, 1), (1, 0), (-1, 0))  # the moves 0-3 as (dx, dy), the package's order
TILE_UNITS = {"P": "pot", "O": "onion", "T": "tomato", "D": "dish", "S": "serve", "X": "counter"}  # terrain -> unit
OBS_DIM = 96  # featurize_state with two players and two pots: 2 * (2 * 10 + 28)
_PLANNERS: dict[str, object] = {}  # layout -> MotionPlanner (depends on the terrain only; shared by copies)


def _overcooked():
    try:
        from overcooked.mdp.actions import Action
        from overcooked.mdp.overcooked_mdp import OvercookedGridworld, OvercookedState
        from overcooked.planning.planners import MotionPlanner
    except ImportError as err:
        raise MissingDependencyError("the overcooked package (0.2.1)", OVERCOOKED_INSTALL) from err
    return Action, OvercookedGridworld, OvercookedState, MotionPlanner


class FeatureDistances:
    """overcooked_ai's ``min_cost_to_feature(start, features, with_argmin)`` on a ``MotionPlanner`` whose motion goals
    include every counter: the reachable feature with the fewest steps (ties: the first listed) and its cost, else
    (inf, None). Counters count only with ``counters=True``; otherwise they are unreachable, as under the reference
    ``NO_COUNTERS_PARAMS``. Per-(start, feature) costs are cached: the grid never changes."""

    def __init__(self, planner, counters: bool):
        self.planner, self.counters = planner, counters
        self.counter_cells = set(planner.mdp.get_counter_locations())
        self.motion_planner = self  # featurize_state asks its argument for `.motion_planner`
        self.cost: dict[tuple, float] = {}

    def _cost(self, start, feature) -> float:
        key = (start, feature)
        if key not in self.cost:
            best = np.inf
            if self.counters or feature not in self.counter_cells:
                for goal in self.planner.motion_goals_for_pos[feature]:
                    if self.planner.is_valid_motion_start_goal_pair(start, goal):
                        best = min(best, self.planner.get_gridworld_distance(start, goal))
            self.cost[key] = best
        return self.cost[key]

    def min_cost_to_feature(self, start_pos_and_or, feature_pos_list, with_argmin: bool = False):
        best, best_feature = np.inf, None
        for feature in feature_pos_list:
            cost = self._cost(start_pos_and_or, feature)
            if cost < best:
                best, best_feature = cost, feature
        return (best + 1, best_feature) if with_argmin else best + 1  # +1: the interact


def motion_planner(layout: str):
    """The package's single-cook ``MotionPlanner`` for a layout, every counter a valid goal (built once, ~0.1 s)."""
    if layout not in _PLANNERS:
        _, gridworld, _, planner = _overcooked()
        mdp = gridworld.from_layout_name(LAYOUTS[layout])
        _PLANNERS[layout] = planner(mdp, counter_goals=mdp.get_counter_locations())
    return _PLANNERS[layout]


class OvercookedMultiAgent(MultiAgentEnv):
    """Two cooks on an Overcooked-AI layout (see the module docstring for observations, reward and departures)."""

    n_agents = 2
    noop_action = STAY  # what a hard-blocked action becomes (sbc_blocking.BlockedEnv)

    def __init__(
        self,
        layout: str = "cramped_room",
        episode_limit: int = 400,
        shaped_reward: float = 0.0,
        old_dynamics: bool = True,
        random_start: bool = False,
        counter_features: bool = False,
    ):
        if layout not in LAYOUTS:
            raise ConfigError(f"unknown overcooked layout {layout!r}; choose from: {', '.join(LAYOUTS)}")
        if isinstance(episode_limit, bool) or not isinstance(episode_limit, int) or episode_limit < 1:
            raise ConfigError(f"overcooked episode_limit={episode_limit!r} must be an integer >= 1 (default 400)")
        if isinstance(shaped_reward, bool) or not isinstance(shaped_reward, (int, float)) or not shaped_reward >= 0:
            raise ConfigError(f"overcooked shaped_reward={shaped_reward!r} must be a number >= 0 (default 0.0: off)")
        for name, value in [("old_dynamics", old_dynamics), ("random_start", random_start)]:
            if not isinstance(value, bool):
                raise ConfigError(f"overcooked {name}={value!r} must be true or false")
        if not isinstance(counter_features, bool):
            raise ConfigError(f"overcooked counter_features={counter_features!r} must be true or false")
        self.action_table, gridworld, self.state_class, _ = _overcooked()
        self.layout, self.shaped_reward, self.random_start = layout, float(shaped_reward), random_start
        self.mdp = gridworld.from_layout_name(LAYOUTS[layout], old_dynamics=old_dynamics)
        self.planner = motion_planner(layout)
        self.distances = FeatureDistances(self.planner, counters=counter_features)
        self.info = EnvInfo(2, N_ACTIONS, OBS_DIM, 2 * OBS_DIM, episode_limit)
        self.avail = np.ones((2, N_ACTIONS), bool)
        self.starts = list(itertools.permutations(self.mdp.get_valid_player_positions(), 2))  # distinct cells
        self.state = self.mdp.get_standard_start_state()
        self.floor = set(self.mdp.get_valid_player_positions())
        self.tiles = {pos: (TILE_UNITS[kind], *pos) for kind, cells in self.mdp.terrain_pos_dict.items()
                      if kind in TILE_UNITS for pos in cells}  # fmt: skip
        self.last_actions = [STAY, STAY]

    def _observation(self) -> Observation:
        features = self.mdp.featurize_state(self.state, self.distances)  # 2 x (96,) int arrays
        obs = np.stack(features).astype(np.float32)  # (2, 96)
        return Observation(obs, obs.reshape(-1).copy(), self.avail.copy())

    def reset(self, seed: int | None = None) -> Observation:
        if self.random_start:
            positions = self.starts[int(np.random.default_rng(seed).integers(len(self.starts)))]
            self.state = self.state_class.from_player_positions(
                positions, bonus_orders=self.mdp.start_bonus_orders, all_orders=self.mdp.start_all_orders
            )
        else:
            self.state = self.mdp.get_standard_start_state()
        self.last_actions = [STAY, STAY]
        return self._observation()

    def step(self, actions) -> Step:
        a = self.check_actions(actions, self.avail)
        self.last_actions = a.tolist()
        joint = [self.action_table.INDEX_TO_ACTION[k] for k in a.tolist()]
        self.state, infos = self.mdp.get_state_transition(self.state, joint)
        sparse = float(sum(infos["sparse_reward_by_agent"]))
        shaped = float(sum(infos["shaped_reward_by_agent"]))
        info = {"sparse_reward": sparse, "shaped_reward": shaped, "soups": sum(infos["event_infos"]["soup_delivery"])}
        truncated = self.state.timestep >= self.info.episode_limit
        return Step(self._observation(), sparse + self.shaped_reward * shaped, False, truncated, info)

    # ------------------------------------------------------------ SBC's blockable units: floor cells and tiles

    def blockable_units(self) -> tuple[tuple, ...]:
        cells = [("cell", *pos) for pos in sorted(self.floor)]
        return (*cells, *sorted(self.tiles.values()))

    def _faced(self, player) -> tuple[int, int]:
        (x, y), (dx, dy) = player.position, player.orientation
        return x + dx, y + dy

    def occupied_units(self) -> list[frozenset]:
        """Per cook, its cell, and the tile it interacted with in the step just taken."""
        out = []
        for player, action in zip(self.state.players, self.last_actions, strict=True):
            used = self.tiles.get(self._faced(player)) if action == INTERACT else None
            out.append(frozenset({("cell", *player.position)} | ({used} if used else set())))
        return out

    def action_units(self, actions) -> list[frozenset]:
        """Per cook, the floor cell its move would enter, or the tile its interact would use."""
        out = []
        for player, action in zip(self.state.players, np.asarray(actions).tolist(), strict=True):
            if action < len(DIRECTIONS):
                x, y = player.position
                target = (x + DIRECTIONS[action][0], y + DIRECTIONS[action][1])
                out.append(frozenset({("cell", *target)}) if target in self.floor else frozenset())
            else:
                used = self.tiles.get(self._faced(player)) if action == INTERACT else None
                out.append(frozenset({used}) if used else frozenset())
        return out
