"""A greedy scripted cook for :class:`~leantrain.marl.overcooked_env.OvercookedMultiAgent`: a fixed partner for
checks and zero-shot-coordination evaluation (self-written, in the spirit of overcooked_ai's ``GreedyHumanModel``,
not a copy of it).

Each step the cook picks one goal from what it holds and what the pots need, then takes the first action of the
package ``MotionPlanner``'s shortest plan to the nearest reachable cell facing that goal (the plan ends with
*interact*, so standing there and facing it, it interacts):

- holding soup: a serving spot; holding an onion: a pot that still takes onions; holding a dish: a ready pot, else a
  cooking one (it waits there, interacting, until the soup is done);
- empty-handed: a filled pot that has not started (only under ``old_dynamics=False``), else a dish (from a dispenser
  or a counter) while fewer dishes are carried than pots are cooking or ready, else an onion while the pots lack
  more onions than the cooks carry;
- a cook that cannot reach where an item goes (``forced_coordination``) fetches it from a dispenser only while its
  partner lacks it, counting the items already lying on counters, and puts it on the nearest empty counter its
  partner can reach; with nothing to do a cook moves at random (on cramped_room one cell alone faces the pot, and an
  idle cook standing there would block its partner forever).

Cooks plan alone, so they can block each other: when the next cell of the plan holds the partner, or the same move
failed on the previous step (both cooks stepping into one cell), the cook moves in a random direction instead (from
its own seeded generator), which breaks such deadlocks.
"""

from __future__ import annotations

import numpy as np

from leantrain.errors import ConfigError
from leantrain.marl.overcooked_env import OvercookedMultiAgent


class GreedyCook:
    """``act(env) -> int``: the action of cook ``agent`` in ``env``'s current state (see the module docstring)."""

    def __init__(self, agent: int, seed: int = 0):
        if agent not in (0, 1):
            raise ConfigError(f"GreedyCook agent={agent!r} must be 0 or 1 (Overcooked has two cooks)")
        self.agent = agent
        self.rng = np.random.default_rng(seed)
        self.last = None  # (pos_and_or, action) of the previous call

    def act(self, env: OvercookedMultiAgent) -> int:
        from overcooked.mdp.actions import Action

        me, partner = env.state.players[self.agent], env.state.players[1 - self.agent]
        plan = self._plan(env)
        wander = Action.ALL_ACTIONS[int(self.rng.integers(4))]  # a random move (into a counter: a turn)
        step = wander if plan is None else plan[0]  # idle: out of the partner's way (one cell reaches the pot)
        if plan is not None and step in Action.MOTION_ACTIONS and step != Action.STAY:
            stuck = self.last is not None and self.last == (me.pos_and_or, step)  # the same move failed last step
            if stuck or Action.move_in_direction(me.position, step) == partner.position:
                step = wander
        self.last = (me.pos_and_or, step)
        return Action.ACTION_TO_INDEX[step]

    def _plan(self, env: OvercookedMultiAgent):
        """The action plan towards the first reachable goal in the priority order, else None."""
        state, mdp = env.state, env.mdp
        me, partner = state.players[self.agent], state.players[1 - self.agent]
        pots = mdp.get_pot_states(state)
        counters = mdp.get_counter_objects_dict(state)
        held = me.held_object.name if me.held_object else None
        carried = [p.held_object.name for p in state.players if p.held_object]
        open_pots = pots["empty"] + mdp.get_partially_full_pots(pots)  # pots that still take onions
        busy = pots["ready"] + pots["cooking"]
        if held == "soup":
            return self._reach_or_hand_over(env, me, partner, mdp.get_serving_locations())
        if held == "onion":
            return self._reach_or_hand_over(env, me, partner, open_pots)
        if held == "dish":
            return self._reach_or_hand_over(env, me, partner, pots["ready"] or busy)
        if not mdp.old_dynamics and mdp.get_full_but_not_cooking_pots(pots):
            plan = self._nearest(env, me.pos_and_or, mdp.get_full_but_not_cooking_pots(pots))
            if plan is not None:
                return plan
        missing = sum(3 - len(state.get_object(p).ingredients) if state.has_object(p) else 3 for p in open_pots)
        wants = [("dish", mdp.get_dish_dispenser_locations(), busy, len(busy))]
        wants.append(("onion", mdp.get_onion_dispenser_locations(), open_pots, missing))
        for item, dispensers, destinations, need in wants:
            lying = counters[item]
            if self._nearest(env, me.pos_and_or, destinations) is not None:  # it can take the item there itself
                plan = self._nearest(env, me.pos_and_or, dispensers + lying) if need > carried.count(item) else None
            else:  # it can only hand the item over: no more than its partner still lacks
                plan = (
                    self._nearest(env, me.pos_and_or, dispensers) if need > carried.count(item) + len(lying) else None
                )
            if plan is not None:
                return plan
        return None

    def _reach_or_hand_over(self, env, me, partner, destinations):
        plan = self._nearest(env, me.pos_and_or, destinations)
        if plan is not None or self._nearest(env, partner.pos_and_or, destinations) is None:
            return plan  # None: nobody can use the item now, keep it
        free = env.mdp.get_empty_counter_locations(env.state)
        shared = [c for c in free if self._nearest(env, partner.pos_and_or, [c]) is not None]
        return self._nearest(env, me.pos_and_or, shared)

    @staticmethod
    def _nearest(env, start, cells):
        """The shortest action plan (ending with interact) from ``start`` to one of ``cells``, else None."""
        planner, best, best_cost = env.planner, None, np.inf
        for cell in cells:
            for goal in planner.motion_goals_for_pos[cell]:
                if planner.is_valid_motion_start_goal_pair(start, goal):
                    plan, _, cost = planner.get_plan(start, goal)
                    if cost < best_cost:
                        best, best_cost = plan, cost
        return best
