"""The hooks later methods build on (observation, per-step, reward, agent network, environments) and the fast paths
(sequence unroll, one generator per runner), each with a property that fails if the hook were ignored."""

import copy
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from leantrain.errors import ConfigError
from leantrain.marl import EpisodeRunner, MultiAgentController, make_env, make_matrix_game
from leantrain.marl.env import EnvInfo
from leantrain.marl.learner import LearnerConfig, QLearner
from leantrain.marl.networks import AGENTS, RNNAgent, register_agent
from leantrain.marl.s2q import S2QBehaviour, S2QConfig, S2QLearner

LBF = "lbf:Foraging-8x8-2p-2f-coop-v3"
needs_lbf = pytest.mark.skipif(find_spec("lbforaging") is None, reason="needs the marl extras")


def _step_by_step(mac, obs, actions):
    b, slots = obs.shape[:2]
    h, qs, hs = mac.init_hidden(b), [], []
    for t in range(slots):
        q, h = mac.step(obs[:, t], actions[:, t - 1] if t else None, h)
        qs.append(q)
        hs.append(h.view(b, mac.info.n_agents, -1))
    return torch.stack(qs, 1), torch.stack(hs, 1)


def test_the_sequence_unroll_equals_stepping_the_cell_slot_by_slot():
    torch.manual_seed(0)
    info = EnvInfo(n_agents=3, n_actions=5, obs_dim=7, state_dim=21, episode_limit=9)
    mac = MultiAgentController(info, hidden=16)
    obs, actions = torch.randn(4, 10, 3, 7), torch.randint(0, 5, (4, 9, 3))
    q, h = mac.unroll(obs, actions, hidden=True)
    q_ref, h_ref = _step_by_step(mac, obs, actions)
    assert q.shape == (4, 10, 3, 5) and h.shape == (4, 10, 3, 16)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-6)
    # and the gradients agree too (training backpropagates through the fused call)
    g = torch.autograd.grad(mac.unroll(obs, actions).square().sum(), list(mac.parameters()))
    g_ref = torch.autograd.grad(_step_by_step(mac, obs, actions)[0].square().sum(), list(mac.parameters()))
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_agent_network_registered_by_name_is_used_by_the_controller():
    class Doubled(RNNAgent):
        def forward(self, inputs, h):
            q, h = super().forward(inputs, h)
            return 2 * q, h

    register_agent("doubled-test")(Doubled)
    try:
        info = make_matrix_game("climbing").info
        torch.manual_seed(0)
        plain = MultiAgentController(info, hidden=8)
        torch.manual_seed(0)
        doubled = MultiAgentController(info, hidden=8, agent="doubled-test")
        assert isinstance(doubled.agent, Doubled) and isinstance(doubled.like().agent, Doubled)
        obs = torch.ones(1, 2, 1)
        q_plain, _ = plain.step(obs, None, plain.init_hidden(1))
        q_doubled, _ = doubled.step(obs, None, doubled.init_hidden(1))
        torch.testing.assert_close(q_doubled, 2 * q_plain)
        with pytest.raises(ConfigError, match="unknown MARL agent network 'nope'"):
            MultiAgentController(info, agent="nope")
    finally:
        AGENTS.pop("doubled-test")


@needs_lbf
def test_the_observation_hook_changes_what_agents_see_and_the_batch_keeps_both():
    envs = [make_env(LBF), make_env(LBF)]
    torch.manual_seed(0)
    mac = MultiAgentController(envs[0].info, hidden=8)
    seen = []
    runner = EpisodeRunner(envs, mac, seed=0)

    def blind_second_agent(t, obs, state, avail, fresh):
        seen.append(fresh.copy())
        out = obs.copy()
        out[:, 1] = 0.0
        return out

    runner.observation_hook = blind_second_agent
    batch, stats = runner.run(epsilon=1.0)
    filled = batch["filled"].sum(1).long()
    for i in range(2):
        slots = int(filled[i]) + 1  # every observation of the episode, its last one included
        assert (batch["obs"][i, :slots, 1] == 0).all()
        assert (batch["env_obs"][i, :slots, 1] != 0).any(1).all()
        torch.testing.assert_close(batch["obs"][i, :slots, 0], batch["env_obs"][i, :slots, 0])
    assert seen[0].all()  # both resets are fresh
    assert sum(int(f.sum()) for f in seen) == stats.steps + 2  # each observation passes the hook exactly once
    # the agents acted on the hooked observations: replaying them gives the same greedy actions as a greedy run
    runner.observation_hook = blind_second_agent
    greedy, _ = runner.run(epsilon=0.0, test=True)
    q = mac.unroll(greedy["obs"], greedy["actions"])
    chosen = q[:, :-1].masked_fill(~greedy["avail"][:, :-1], -1e9).argmax(-1)
    mask = greedy["filled"].bool()
    assert torch.equal(chosen[mask], greedy["actions"][mask])


def test_step_hooks_run_in_training_episodes_only_and_may_record_fields():
    envs = [make_matrix_game("climbing") for _ in range(3)]
    runner = EpisodeRunner(envs, MultiAgentController(envs[0].info, hidden=8), seed=0)
    calls = []

    def count(t, transition):
        calls.append((t, transition["active"].copy(), transition["reward"].copy()))
        runner.record("bonus", np.ones((3, 1)) * 7)

    runner.step_hooks.append(count)
    runner.step_fields = {"bonus": (1,)}
    batch, stats = runner.run(epsilon=1.0)
    assert len(calls) == 1 and calls[0][1].all()
    np.testing.assert_allclose(calls[0][2], stats.returns)
    assert (batch["step_bonus"] == 7).all()
    batch, _ = runner.run(epsilon=0.0, test=True)
    assert len(calls) == 1 and (batch["step_bonus"] == 0).all()  # never in test episodes: the field stays 0


class _Bonus:
    """A learner mixin whose intrinsic reward is a fixed tensor."""

    bonus = None

    def intrinsic_reward(self, batch):
        return self.bonus


class _BonusQ(_Bonus, QLearner):
    pass


class _BonusS2Q(_Bonus, S2QLearner):
    pass


@pytest.mark.parametrize("cls", [_BonusQ, _BonusS2Q])
def test_an_intrinsic_reward_reaches_every_learners_targets(cls):
    """Training with reward r and bonus b equals training on reward r + b (fails if a learner skips the hook)."""
    envs = [make_matrix_game("climbing") for _ in range(8)]
    torch.manual_seed(0)
    mac = MultiAgentController(envs[0].info, hidden=8)
    batch, _ = EpisodeRunner(envs, mac, seed=0).run(epsilon=1.0)
    config = LearnerConfig(td_lambda=0.6, optimizer="adam", lr=1e-3)
    extra = (S2QConfig(k=2),) if cls is _BonusS2Q else ()
    torch.manual_seed(1)
    with_bonus = cls(copy.deepcopy(mac), config, *extra)
    with_bonus.bonus = torch.full_like(batch["reward"], 3.0)
    shifted = copy.deepcopy(with_bonus)
    shifted.bonus = None
    moved = copy.copy(batch)
    moved.data = {**batch.data, "reward": batch["reward"] + 3.0}
    a, b = with_bonus.train(batch, 8), shifted.train(moved, 8)
    assert a["loss"] == b["loss"]
    plain = copy.deepcopy(shifted)
    assert plain.train(batch, 8)["loss"] != a["loss"]


def test_w_c_first_weights_q1_only():
    envs = [make_matrix_game("climbing") for _ in range(8)]
    torch.manual_seed(0)
    mac = MultiAgentController(envs[0].info, hidden=8)
    batch, _ = EpisodeRunner(envs, mac, seed=0).run(epsilon=1.0)
    config = LearnerConfig(td_lambda=0.6, optimizer="adam", lr=1e-3)
    torch.manual_seed(1)
    base = S2QLearner(copy.deepcopy(mac), config, S2QConfig(k=2, w_c=0.9))
    losses = {}
    for name, options in {"unset": {}, "same": {"w_c_first": 0.9}, "low": {"w_c_first": 0.0}}.items():
        learner = copy.deepcopy(base)
        learner.s2q = S2QConfig(k=2, w_c=0.9, **options)
        losses[name] = learner.td_loss(batch.trimmed())[1]["losses"]
    assert all(torch.equal(losses["unset"][k], losses["same"][k]) for k in losses["unset"])
    assert losses["low"]["sub1"] < losses["unset"]["sub1"]  # some taken actions are not the best: weight 0 there
    assert all(torch.equal(losses["low"][k], losses["unset"][k]) for k in ("sub2", "sub3", "central", "latent"))
    with pytest.raises(ConfigError, match="w_c_first"):
        S2QConfig(w_c_first=1.5)


@pytest.mark.parametrize(("draw", "all_same"), [("batch", True), ("episode", False)])
def test_s2q_draws_the_behaviour_mode_once_per_batch_by_default(draw, all_same):
    envs = [make_matrix_game("climbing") for _ in range(16)]
    mac = MultiAgentController(envs[0].info, hidden=8)
    learner = S2QLearner(mac, LearnerConfig(), S2QConfig(k=2, behaviour_draw=draw))
    runner = EpisodeRunner(envs, mac, seed=0)
    hook = S2QBehaviour(learner, runner, seed=0)
    runner.action_hook = hook
    modes = []
    for _ in range(6):
        runner.run(epsilon=0.5)
        modes.append(hook.mixed.copy())
    same = [bool((m == m[0]).all()) for m in modes]
    if all_same:  # one mode for the whole batch, and both modes occur over batches
        assert all(same) and any(m.all() for m in modes) and any((~m).all() for m in modes)
    else:
        assert not all(same)


def test_environment_kinds_are_registered_and_env_args_are_checked():
    with pytest.raises(ConfigError, match="unknown environment 'nowhere:x'"):
        make_env("nowhere:x")
    with pytest.raises(ConfigError, match="do not apply to matrix"):
        make_env("matrix:climbing", max_episode_steps=3)


@needs_lbf
def test_lbf_env_args_shorten_episodes_and_add_players():
    env = make_env("lbf:Foraging-8x8-4p-2f-coop-v3", max_episode_steps=12)
    assert env.info.n_agents == 4 and env.info.episode_limit == 12
    runner = EpisodeRunner([env], MultiAgentController(env.info, hidden=8), seed=0)
    _, stats = runner.run(epsilon=1.0)
    assert stats.lengths[0] <= 12
    with pytest.raises(ConfigError, match="env_args"):
        make_env(LBF, no_such_option=1)


@needs_lbf
def test_predator_prey_has_learning_predators_and_a_fleeing_prey():
    from leantrain.marl.gym_adapters import MPE_MOVES, flee_action

    prey, predators = np.array([0.0, 0.0]), np.array([[0.5, 0.1], [-0.9, -0.9]])
    move = MPE_MOVES[flee_action(prey, predators)]
    assert move @ (prey - predators[0]) > 0  # away from the nearest predator
    assert MPE_MOVES[flee_action(np.array([0.95, 0.0]), np.array([[0.5, 0.0]]))][0] < 0  # back in at the border
    env = make_env("mpe:simple_tag", n_predators=5)
    assert env.info.n_agents == 5 and env.info.n_actions == 5 and env.info.episode_limit == 25
    runner = EpisodeRunner([env], MultiAgentController(env.info, hidden=8), seed=0)
    batch, stats = runner.run(epsilon=1.0)
    assert stats.lengths == [25] and batch["obs"].shape[2] == 5
    assert all(r % 10 == 0 for r in batch["reward"][0].tolist())  # 10 per predator touching the prey
    with pytest.raises(ConfigError, match="prey"):
        make_env("mpe:simple_tag", prey="smart")
    slow = make_env("mpe:simple_tag", prey_speed=1.0)
    slow.reset(seed=1)
    speeds = {a.name: a.max_speed for a in slow.env.unwrapped.world.agents}
    assert speeds == {"adversary_0": 1.0, "adversary_1": 1.0, "adversary_2": 1.0, "adversary_3": 1.0, "agent_0": 1.0}


@pytest.mark.skipif(find_spec("vmas") is None, reason="needs vmas")
def test_vmas_scenarios_run_through_the_same_runner():
    env = make_env("vmas:balance", max_steps=7)
    assert env.info.n_agents >= 2 and env.info.episode_limit == 7
    runner = EpisodeRunner([env, make_env("vmas:balance", max_steps=7)], MultiAgentController(env.info, hidden=8))
    batch, stats = runner.run(epsilon=1.0)
    assert stats.lengths == [7, 7] and batch["obs"].shape == (2, 8, env.info.n_agents, env.info.obs_dim)
    assert env.reset(seed=10_007 * 1_000_003).obs.shape == (env.info.n_agents, env.info.obs_dim)  # a test runner's
    with pytest.raises(ConfigError, match="unknown vmas scenario"):
        make_env("vmas:nowhere")


def test_the_std_damage_scale_makes_the_critical_step_scale_free():
    from leantrain.marl.wolfpack import WolfpackConfig, WolfpackPlanner

    info = EnvInfo(n_agents=3, n_actions=4, obs_dim=5, state_dim=6, episode_limit=30)
    mac = MultiAgentController(info, hidden=8)
    pred = torch.linspace(0.02, 0, 20).expand(3, 20).clone()  # damages of a task whose return is at most 1

    def offsets(scale: float, mode: str) -> list[bool]:
        planner = WolfpackPlanner(mac, WolfpackConfig(damage_scale=mode))
        planner.predict = lambda states, t: pred * scale
        rng = np.random.default_rng(0)
        return [planner.critical(torch.zeros(1, 6), 0, None, rng)[0] for _ in range(400)]

    assert offsets(1.0, "std") == offsets(1000.0, "std")  # the same draws at any Q scale
    raw_small, raw_large = offsets(1.0, "raw"), offsets(1000.0, "raw")
    assert raw_small != raw_large and sum(raw_small) < sum(raw_large)  # raw: nearly uniform at small scale


def test_a_learner_registered_from_outside_drives_collection_and_adds_test_conditions(tmp_path):
    """The run loop asks the learner (no branch on its name): exploration, extra test conditions, test fields."""
    import json

    from leantrain.config import resolve
    from leantrain.marl.learners import LEARNERS, register_learner
    from leantrain.runs.launch import run

    asked = []

    class Greedy(QLearner):
        def collection_epsilon(self, t_env, epsilon):
            asked.append(t_env)
            return 0.0

        def evaluation_runners(self, make_runner):
            return {"shadow": make_runner(5)}

        def test_stats(self, runner):
            return {"updates_so_far": self.updates}

    register_learner("greedy-test")(lambda cfg, mac, lc, runner: Greedy(mac, lc))
    try:
        small = ["marl.algo=greedy-test", "marl.max_steps=64", "marl.eval_every=32", "marl.test_episodes=2",
                 "marl.batch_episodes=4", "marl.n_envs=2", "progress=none", f"output_dir={tmp_path}"]  # fmt: skip
        result = run(resolve("qmix-climbing", small))
    finally:
        LEARNERS.pop("greedy-test")
    assert asked == list(range(0, 64, 2))  # asked before every batch of 2 one-step episodes
    tests = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"test"' in x]
    assert all("shadow_return_mean" in r and "updates_so_far" in r for r in tests)
    assert "shadow_test_return" in result.summary["final"]


def test_an_attack_uses_its_own_timing_rule_with_a_shared_planner():
    """evaluate_attacks fits one planner and attacks with several rules: the attack's rule must decide (a bug fixed:
    the planner's own config was read, so the `wolfpack_std` condition repeated `wolfpack`)."""
    from leantrain.marl.wolfpack import WolfpackAttack, WolfpackConfig, WolfpackPlanner

    envs = [make_matrix_game("climbing") for _ in range(2)]
    mac = MultiAgentController(envs[0].info, hidden=8)
    planner = WolfpackPlanner(mac, WolfpackConfig(followups=1))
    seen = []
    planner.critical = lambda states, t, since, rng, rule=None: seen.append(rule) or (False, 0)
    rule = WolfpackConfig(followups=1, damage_scale="std", temperature=0.1)
    runner = EpisodeRunner(envs, mac, seed=0)
    WolfpackAttack(runner, mac, torch.nn.Identity(), planner, rule)
    runner.run(0.0, test=True)
    assert seen and all(r is rule for r in seen)


@pytest.mark.parametrize("env,module", [("lbf:Foraging-8x8-2p-2f-coop-v3", "lbforaging"),
                                        ("mpe:simple_spread", "mpe2"), ("mpe:simple_tag", "mpe2"),
                                        ("vmas:balance", "vmas")])  # fmt: skip
def test_a_missing_environment_package_names_its_install_command(env, module, monkeypatch):
    import sys

    from leantrain.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"is not installed; install it with: pip install .*\[marl\]"):
        make_env(env)
