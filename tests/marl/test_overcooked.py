"""The Overcooked adapter: the cooking dynamics (a hand-written plan delivers one soup with the exact rewards and cook
time, under both pot rules), scripted pairs deliver on every layout, the featurized observations, seeds, truncation,
validation, and that no planner pickle is read or written. Skips when the ``overcooked`` package is absent, except
the check of unknown layouts, which needs no package."""

import os

import numpy as np
import pytest

from leantrain.errors import ConfigError
from leantrain.marl import make_env
from leantrain.marl.overcooked_env import LAYOUTS, FeatureDistances, OvercookedMultiAgent
from leantrain.marl.overcooked_scripted import GreedyCook

N, S, E, W, STAY, INTERACT = range(6)  # the package's Action.ALL_ACTIONS order

# cramped_room:   x 0 1 2 3 4
#            y 0:   X X P X X      agent 0 starts at (1, 2), agent 1 at (3, 1), both facing north
#            y 1:   O . . 1 O
#            y 2:   X 0 . . X
#            y 3:   X D X S X
# agent 0 alone (agent 1 stays): three onions from (0, 1) into the pot (2, 0), a dish from (1, 3), back under the pot
FIRST_ONION = [N, W, INTERACT, E, N, INTERACT]  # steps 1-6: onion 1 in the pot at step 6
MORE_ONIONS = [W, INTERACT, E, N, INTERACT] * 2  # onions 2 and 3 in at steps 11 and 16
DISH = [W, S, INTERACT, N, E, N]  # dish taken at step 19; facing the pot again at step 22
SERVE = [S, E, S, INTERACT]  # from under the pot to (3, 2), face the serving spot (3, 3), serve


@pytest.fixture
def overcooked():
    return pytest.importorskip("overcooked")


def _run(env, plan0, plan1=None):
    plan1 = plan1 or [STAY] * len(plan0)
    return [env.step(np.array([a, b])) for a, b in zip(plan0, plan1, strict=True)]


def _pot(obs_row):  # the closest pot's 10 features of an agent: exists, empty, full, cooking, ready, onions, ...
    return obs_row[22:32]


def test_a_hand_written_plan_delivers_one_soup_with_the_exact_rewards(overcooked):
    env = make_env("overcooked:cramped_room")
    assert env.info.n_agents == 2 and env.info.n_actions == 6 and env.info.episode_limit == 400
    env.reset(seed=0)
    steps = _run(env, FIRST_ONION + MORE_ONIONS + DISH)  # 22 steps
    shaped = [s.info["shaped_reward"] for s in steps]
    # 3 per onion in the pot (steps 6, 11, 16), 3 for the dish taken while the soup cooks (step 19)
    assert {i + 1: r for i, r in enumerate(shaped) if r} == {6: 3.0, 11: 3.0, 16: 3.0, 19: 3.0}
    assert all(s.reward == 0.0 for s in steps)  # shaped_reward defaults to 0: the team reward is the sparse one
    pot = _pot(steps[15].observation.obs[0])  # after the third onion: the pot cooks by itself (old dynamics)
    assert pot[:8].tolist() == [1, 0, 1, 1, 0, 3, 0, 19]  # exists, full, cooking, 3 onions, 19 steps left
    # the soup cooks 20 steps counting the third onion's (16-35): one step left after step 34, ready after step 35
    steps = _run(env, [INTERACT] * 12)  # steps 23-34: interacting with a dish at a cooking pot does nothing
    assert env.state.players[0].held_object.name == "dish"
    assert _pot(steps[-1].observation.obs[0])[[4, 7]].tolist() == [0, 1]  # not ready, one step left
    steps = _run(env, [INTERACT, INTERACT])  # step 35: still cooking when it acts; step 36: soup into the dish
    assert _pot(steps[0].observation.obs[0])[4] == 1 and [s.info["shaped_reward"] for s in steps] == [0.0, 5.0]
    assert env.state.players[0].held_object.name == "soup"
    steps = _run(env, SERVE)  # steps 37-40
    assert [s.reward for s in steps] == [0.0, 0.0, 0.0, 20.0] and steps[-1].info["soups"] == 1
    assert env.state.players[0].held_object is None and env.state.timestep == 40


def test_under_the_new_pot_rule_a_full_pot_waits_for_an_interact(overcooked):
    env = make_env("overcooked:cramped_room", old_dynamics=False, shaped_reward=0.5)
    env.reset()
    steps = _run(env, FIRST_ONION + MORE_ONIONS)
    assert _pot(steps[-1].observation.obs[0])[:6].tolist() == [1, 0, 1, 0, 0, 3]  # full, not cooking
    assert sum(s.reward for s in steps) == 0.5 * 9  # the shaped reward, scaled: three onions at 3
    steps = _run(env, [STAY] * 25)
    assert _pot(steps[-1].observation.obs[0])[3] == 0  # still not cooking
    steps = _run(env, [INTERACT, STAY])  # empty-handed, facing the pot: starts it
    assert _pot(steps[-1].observation.obs[0])[3] == 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_greedy_scripted_pair_delivers_soups_on_every_layout(overcooked, layout):
    """Measured with these seeds: 10 soups on cramped_room (the first served at step 45), 14 on
    asymmetric_advantages (34), 8 on coordination_ring (87), 13 on forced_coordination (49; every onion and dish
    handed over a counter) and 4 on counter_circuit (176) in 400 steps."""
    env = make_env(f"overcooked:{layout}")
    cooks = [GreedyCook(0, seed=0), GreedyCook(1, seed=1)]
    env.reset(seed=0)
    steps = []
    while not (steps and steps[-1].truncated):
        steps.append(env.step(np.array([cook.act(env) for cook in cooks])))
    soups = sum(s.info["soups"] for s in steps)
    assert soups >= (5 if layout == "cramped_room" else 1) and len(steps) == 400
    assert sum(s.reward for s in steps) == 20.0 * soups  # every soup served is worth exactly 20


def test_observations_have_the_documented_layout(overcooked):
    env = make_env("overcooked:cramped_room")
    o = env.reset(seed=0)
    assert o.obs.shape == (2, 96) and o.obs.dtype == np.float32 and o.state.shape == (192,)
    assert o.avail.shape == (2, 6) and o.avail.all()
    assert np.array_equal(o.state, o.obs.reshape(-1))
    assert o.obs[0, 94:].tolist() == [1, 2] and o.obs[1, 94:].tolist() == [3, 1]  # absolute (x, y)
    assert o.obs[0, 92:94].tolist() == [2, -1] and o.obs[1, 92:94].tolist() == [-2, 1]  # partner relative to self
    assert np.array_equal(o.obs[0, 46:92], o.obs[1, :46]) and np.array_equal(o.obs[1, 46:92], o.obs[0, :46])
    assert o.obs[0, :4].tolist() == [1, 0, 0, 0]  # facing north
    assert o.obs[0, 8:10].tolist() == [-1, -1] and o.obs[0, 12:14].tolist() == [0, 1]  # closest onion, dish
    assert o.obs[0, 10:12].tolist() == [0, 0]  # no tomato on this layout: (0, 0), as in the reference code
    steps = _run(env, [N, W, INTERACT])
    assert steps[-1].observation.obs[0, 4:8].tolist() == [1, 0, 0, 0]  # holding an onion
    assert steps[-1].observation.obs[0, :4].tolist() == [0, 0, 0, 1]  # facing west


def test_counter_features_show_items_handed_over_a_counter(overcooked):
    """forced_coordination: agent 1 (left) puts an onion on the middle counter (2, 2); agent 0 (right, at (3, 1))
    cannot reach any onion dispenser, so its closest onion is that counter only with ``counter_features``."""
    for counters, expected in [(False, [0, 0]), (True, [-1, 1])]:
        env = make_env("overcooked:forced_coordination", counter_features=counters)
        env.reset()
        steps = _run(env, [STAY] * 4, [W, INTERACT, E, INTERACT])
        assert env.state.has_object((2, 2)) and steps[-1].observation.obs[0, 8:10].tolist() == expected


def test_reset_is_reproducible_and_random_starts_follow_the_seed(overcooked):
    env = make_env("overcooked:coordination_ring")
    assert np.array_equal(env.reset(seed=1).obs, env.reset(seed=2).obs)  # fixed starts by default
    env = make_env("overcooked:coordination_ring", random_start=True)
    rng = np.random.default_rng(0)
    actions = rng.integers(6, size=(50, 2))
    runs = []
    for seed in (7, 7, 8):
        first = env.reset(seed=seed)
        runs.append([first.obs] + [env.step(a).observation.obs for a in actions])
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    starts = {tuple(map(tuple, env.reset(seed=s).obs[:, 94:].astype(int))) for s in range(10)}
    assert len(starts) > 5 and all(a != b for a, b in starts)  # distinct cells for the two cooks


def test_a_random_pair_plays_to_the_episode_limit_and_invalid_actions_are_refused(overcooked):
    env = make_env("overcooked:counter_circuit", episode_limit=120)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    steps = [env.step(rng.integers(6, size=2)) for _ in range(120)]
    assert [s.truncated for s in steps] == [False] * 119 + [True] and not any(s.terminated for s in steps)
    env = make_env("overcooked:cramped_room")
    env.reset(seed=0)
    steps = [env.step(rng.integers(6, size=2)) for _ in range(400)]
    assert steps[-1].truncated and not any(s.truncated for s in steps[:-1])
    for bad in ([0, 6], [0, -1], [0]):
        with pytest.raises(ValueError, match="actions"):
            env.step(np.array(bad))


def test_unknown_layouts_and_bad_options_raise_config_errors():
    with pytest.raises(ConfigError, match="cramped_room, asymmetric_advantages, coordination_ring"):
        make_env("overcooked:nope")
    for bad in ({"episode_limit": 0}, {"shaped_reward": -1.0}, {"old_dynamics": "yes"}, {"horizon": 10}):
        with pytest.raises(ConfigError):
            make_env("overcooked:cramped_room", **bad)
    with pytest.raises(ConfigError, match="agent=2"):
        GreedyCook(2)


def test_feature_distances_follow_overcooked_ai_and_no_planner_pickle_is_touched(overcooked, tmp_path):
    planners = os.path.join(os.path.dirname(overcooked.__file__), "data", "planners")
    before = sorted(os.listdir(planners))
    env = OvercookedMultiAgent("forced_coordination")
    env.reset()
    distances = FeatureDistances(env.planner, counters=False)
    start = env.state.players[0].pos_and_or  # (3, 1) facing north, right of the middle counters
    assert distances.min_cost_to_feature(start, [], with_argmin=True) == (np.inf, None)
    assert distances.min_cost_to_feature(start, [(0, 1), (0, 2)], with_argmin=True)[1] is None  # other side
    assert distances.min_cost_to_feature(start, [(0, 1), (3, 0)], with_argmin=True) == (1, (3, 0))  # facing it
    assert distances.min_cost_to_feature(start, [(2, 2)], with_argmin=True)[1] is None  # a counter
    assert FeatureDistances(env.planner, counters=True).min_cost_to_feature(start, [(2, 2)]) == 3
    assert sorted(os.listdir(planners)) == before
