"""Wolfpack attack and WALL: budget, cycle structure, worst actions, stored intended actions, planner parts."""

import dataclasses

import numpy as np
import pytest
import torch

from leantrain.errors import ConfigError
from leantrain.marl import EpisodeRunner, MultiAgentController, ReplayBuffer, make_env
from leantrain.marl.learner import LearnerConfig
from leantrain.marl.wall import WALLLearner
from leantrain.marl.wolfpack import (
    WolfpackAttack,
    WolfpackConfig,
    WolfpackPlanner,
    kl_followups,
    windows,
    worst_actions,
)

pytest.importorskip("lbforaging")
ENV = "lbf:Foraging-8x8-4p-2f-v3"  # four players: the two follow-ups are a real choice among three


def _setup(config: WolfpackConfig, envs: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    env_list = [make_env(ENV) for _ in range(envs)]
    mac = MultiAgentController(env_list[0].info, hidden=16)
    learner = WALLLearner(mac, LearnerConfig(), config)
    runner = EpisodeRunner(env_list, mac, seed=seed)
    attack = WolfpackAttack(runner, mac, learner.mixer, learner.planner, config, seed=seed)
    return runner, attack, learner


def _replay_q(learner, batch):
    """The agent Qs the runner acted on, recomputed from the recorded (intended) actions."""
    return learner.mac.unroll(batch["obs"], batch["actions"])[:, :-1]


@pytest.mark.parametrize("budget", [0, 1, 5, 8])
@pytest.mark.parametrize("method", ["planner", "random"])
def test_attack_never_exceeds_its_budget_and_forces_only_worst_actions(budget, method):
    config = WolfpackConfig(budget=budget, test_budget=budget, step_method=method, initial_agent=method,
                            random_step_prob=0.5)  # fmt: skip
    runner, _, learner = _setup(config)
    for test in (False, True):
        batch, _ = runner.run(epsilon=0.3, test=test)
        attacked = batch["step_attacked"].bool()  # (B, T, N)
        steps = attacked.any(-1).sum(1)
        assert (steps <= budget).all()
        executed, intended = batch["step_executed"].long(), batch["actions"]
        # only attacked agents deviate from what they chose, and they execute their worst available action
        assert ((executed != intended) <= attacked).all()
        with torch.no_grad():
            worst = worst_actions(_replay_q(learner, batch), batch["avail"][:, :-1])
        real = batch["filled"].bool()[..., None] & attacked
        assert torch.equal(executed[real], worst[real])
    if budget and method == "random":
        assert steps.max() > 0


def test_cycle_is_initial_agent_then_followups_for_duration_steps():
    config = WolfpackConfig(budget=8, step_method="random", initial_agent="random", random_step_prob=1.0,
                            followup="kl", duration=3, followups=2)  # fmt: skip
    runner, _, _ = _setup(config, envs=1)
    batch, _ = runner.run(epsilon=0.0)
    attacked = batch["step_attacked"][0].bool()  # (T, N)
    for start in (0, 4):
        initial = attacked[start]
        assert initial.sum() == 1
        follow = attacked[start + 1]
        assert follow.sum() == 2 and not (follow & initial).any()
        assert torch.equal(attacked[start + 2], follow) and torch.equal(attacked[start + 3], follow)
    assert not attacked[8:].any()  # budget 8 = two cycles of 1 + 3 steps


def test_runner_stores_intended_actions_and_feeds_them_back():
    config = WolfpackConfig(budget=12, step_method="random", initial_agent="random", random_step_prob=1.0)
    runner, _, learner = _setup(config, envs=1)
    batch, _ = runner.run(epsilon=0.0)
    executed, intended = batch["step_executed"].long(), batch["actions"]
    assert (executed != intended).any()  # the attack changed what was executed ...
    # ... while the stored actions are the greedy choices of the agents fed their own previous intended actions
    with torch.no_grad():
        greedy_again = _replay_q(learner, batch).masked_fill(~batch["avail"][:, :-1], -1e9).argmax(-1)
    real = batch["filled"].bool()
    assert torch.equal(greedy_again[real], intended[real])


def test_kl_followups_exclude_the_initial_agent():
    torch.manual_seed(0)
    env = make_env(ENV)
    mac = MultiAgentController(env.info, hidden=16)
    learner = WALLLearner(mac, LearnerConfig())
    o = env.reset(seed=0)
    obs = torch.as_tensor(o.obs)[None]
    q, _ = mac.step(obs, None, mac.init_hidden(1))
    avail = torch.as_tensor(o.avail)[None]
    intended = q.argmax(-1)
    state = torch.as_tensor(o.state)[None]
    inputs = {"obs": obs, "last_actions": None, "hidden_prev": mac.init_hidden(1), "state": state}
    before = [p.clone() for p in mac.parameters()]
    for initial in range(4):
        picked = kl_followups(mac, learner.mixer, inputs, intended, initial, avail, 2, lr=5e-4)
        assert len(set(picked)) == 2 and initial not in picked
    assert all(torch.equal(a, b) for a, b in zip(before, mac.parameters(), strict=True))  # the policy is untouched


def test_world_model_last_slot_shortcut_equals_the_full_forward():
    torch.manual_seed(0)
    mac = MultiAgentController(make_env(ENV).info, hidden=16)
    planner = WolfpackPlanner(mac, WolfpackConfig(window=6))
    info = mac.info
    states, hidden = torch.randn(5, 6, info.state_dim), torch.randn(5, 6, info.n_agents, 16)
    actions, valid = torch.randint(0, info.n_actions, (5, 6, info.n_agents)), torch.ones(5, 6)
    s_full, o_full = planner.world(states, hidden, actions, valid)
    s_last, o_last = planner.world.forward_last(states, hidden, actions, valid)
    torch.testing.assert_close(s_last, s_full[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o_last, o_full[:, -1], atol=1e-5, rtol=1e-5)


def test_imagined_damage_without_followup_steps_is_the_one_step_qtot_drop():
    config = WolfpackConfig(duration=0, budget=4, step_method="random", initial_agent="random", random_step_prob=0.5)
    runner, _, learner = _setup(config)
    batch = runner.run(epsilon=0.5)[0].trimmed()
    with torch.no_grad():
        q, hidden = learner.mac.unroll(batch["obs"], batch["actions"], hidden=True)
        pos = torch.arange(4)[None].expand(batch.size, 4)
        damage = learner.planner.imagined_damage(batch, q, hidden, batch["step_executed"].long(), pos,
                                                 learner.mac, learner.mixer)  # fmt: skip
        b, n = damage.shape[0], q.shape[2]
        for e in range(b):
            for t in range(4):
                if not batch["filled"][e, t]:
                    continue
                qt, a = q[e, t], batch["actions"][e, t]
                normal = learner.mixer(qt.gather(-1, a[:, None]).T[None], batch["state"][e, t][None, None])
                for i in range(n):
                    forced = a.clone()
                    forced[i] = worst_actions(qt[i], batch["avail"][e, t, i])
                    hit = learner.mixer(qt.gather(-1, forced[:, None]).T[None], batch["state"][e, t][None, None])
                    torch.testing.assert_close(damage[e, t, i], (normal - hit)[0, 0], atol=1e-5, rtol=1e-5)


def test_planner_trains_and_its_losses_fall():
    config = WolfpackConfig(window=8, period=8)
    runner, _, learner = _setup(config, envs=4)
    buffer = ReplayBuffer(64)
    for _ in range(4):
        buffer.insert(runner.run(epsilon=0.5)[0])
    batch = buffer.sample(16)
    first = learner.planner.fit(batch, learner.mac, learner.mixer)
    for _ in range(30):
        last = learner.planner.fit(batch, learner.mac, learner.mixer)
    assert last["loss_world"] < 0.5 * first["loss_world"]
    assert last["loss_damage"] < first["loss_damage"]


def test_critical_step_is_forced_at_the_end_of_the_period():
    config = WolfpackConfig(period=5, window=4)
    _, _, learner = _setup(config, envs=1)
    states = torch.randn(10, learner.mac.info.state_dim)
    rng = np.random.default_rng(0)
    assert all(learner.planner.critical(states, 9, 4, rng)[0] for _ in range(20))  # only offset 0 is left


def test_windows_pad_on_the_left():
    x = torch.arange(1, 5).view(1, 4, 1).float()
    w = windows(x, 3)[0, ..., 0]
    assert w.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]]


def test_bad_attack_options_are_refused():
    with pytest.raises(ConfigError, match="step_method"):
        WolfpackConfig(step_method="sometimes")
    with pytest.raises(ConfigError, match="followups"):
        _setup(dataclasses.replace(WolfpackConfig(), followups=4))
