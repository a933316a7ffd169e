"""FIM and the door world: dynamics, the focus set, the replay statistics (exact and running), the forward model,
the eligibility trace, the bonus in the TD target, the registry and the recipes (mechanics, not results)."""

import copy

import numpy as np
import pytest
import torch

from leantrain.errors import ConfigError
from leantrain.marl import EpisodeRunner, MultiAgentController, ReplayBuffer, make_env
from leantrain.marl.door_world import DoorWorld
from leantrain.marl.fim import FimConfig, FimLearner
from leantrain.marl.fim_focus import RunningDimensionStats, exact_scores, select_focus
from leantrain.marl.fim_influence import counterfactual_influence, eligibility_traces, synchronized_focus
from leantrain.marl.learner import LearnerConfig
from leantrain.marl.targets import td_lambda_targets

STAY, UP, DOWN, LEFT, RIGHT = range(5)


def _play(env: DoorWorld, positions, moves):
    """Place the agents, then play ``moves`` [(a0, a1), ...]; returns the steps."""
    env.reset(seed=0)
    env.positions = list(positions)
    return [env.step(np.array(m)) for m in moves]


def test_a_scripted_pair_opens_the_door_and_reaches_the_goal():
    env = make_env("grid:door")
    assert isinstance(env, DoorWorld) and env.info.state_dim == 5 and env.door_dim == 4
    # agent 0 from (0, 1) up to the plate (0, 0); agent 1 from (0, 3) down to the plate (0, 4)
    steps = _play(env, [(0, 1), (0, 3)], [(UP, DOWN)])
    assert env.door_open and steps[0].observation.state[env.door_dim] == 1.0 and steps[0].reward == 0
    assert (steps[0].observation.obs[:, -1] == 1).all()  # both agents observe the door flag
    # agent 0 walks to the door (3, 2) and through it to the goal (6, 2); the door stays open behind it
    route = [DOWN, DOWN, RIGHT, RIGHT, RIGHT, RIGHT, RIGHT, RIGHT]
    steps = [env.step(np.array([a, LEFT])) for a in route]
    assert [s.reward for s in steps] == [0.0] * 7 + [1.0] and steps[-1].terminated
    assert all(s.observation.state[env.door_dim] == 1.0 for s in steps)


def test_one_agent_alone_cannot_open_the_door():
    env = make_env("grid:door")
    route = [UP, STAY, DOWN, DOWN, DOWN, DOWN, UP, UP, RIGHT, RIGHT, RIGHT, RIGHT, RIGHT, RIGHT]
    steps = _play(env, [(0, 1), (1, 2)], [(a, STAY) for a in route])  # agent 1 never reaches a plate
    assert not env.door_open and all(s.reward == 0 and s.observation.state[4] == 0 for s in steps)
    assert env.positions[0] == (2, 2)  # stopped by the closed door
    # one agent on one plate while the other passes over the other one later: the plates must be held together
    steps = _play(env, [(0, 0), (1, 4)], [(RIGHT, LEFT), (STAY, STAY)])
    assert not env.door_open
    with pytest.raises(ConfigError, match="width"):
        make_env("grid:door", width=6)
    with pytest.raises(ConfigError, match="unknown grid world"):
        make_env("grid:maze")


def _warmed_up(config: FimConfig, batches: int = 6, seed: int = 0):
    """A FIM learner attached to a runner on 8 door worlds, its replay (capacity 64) filled with random play."""
    envs = [make_env("grid:door") for _ in range(8)]
    torch.manual_seed(seed)
    mac = MultiAgentController(envs[0].info, hidden=16)
    learner = FimLearner(mac, LearnerConfig(), config, replay_episodes=64)
    runner = EpisodeRunner(envs, mac, seed=seed)
    learner.attach(runner)
    buffer = ReplayBuffer(64, seed=seed)
    for _ in range(batches):
        batch, _ = runner.run(epsilon=1.0)
        buffer.insert(batch)
    return learner, runner, buffer


def test_the_replay_mirror_holds_exactly_the_replays_states():
    learner, runner, buffer = _warmed_up(FimConfig(), batches=10)  # 80 episodes: the ring has wrapped
    learner.replay_states.flush()
    states, filled = learner.replay_states.contents()
    assert len(buffer) == len(learner.replay_states) == 64
    assert torch.equal(states, buffer.storage["state"]) and torch.equal(filled, buffer.storage["filled"])
    runner.run(epsilon=0.0, test=True)  # test episodes never enter the replay nor the mirror
    assert learner.replay_states.pending is None and learner.replay_states.count == 80


@pytest.mark.parametrize("criterion", ["cog", "entropy"])
def test_after_warm_up_the_focus_set_contains_the_door_flag(criterion):
    learner, runner, buffer = _warmed_up(FimConfig(criterion=criterion, recompute_every=1))
    for k in range(6):
        batch, _ = runner.run(epsilon=1.0)
        buffer.insert(batch)
        learner.train(buffer.sample(8), 8 * (k + 7))
    assert learner.focus_history == [[DoorWorld.door_dim]] * 6
    # the door opened in the replay, and the positions would be picked if it had not
    states, filled = learner.replay_states.contents()
    assert 0 < states[..., 4].max() and select_focus(*exact_scores(states, filled, criterion), 2)[0] != 4


def test_dimensions_that_never_vary_are_never_focused():
    states = torch.zeros(3, 5, 4)
    states[..., 1] = torch.arange(5.0)  # changes every step
    states[0, 4:, 2] = 1.0  # changes once: the most stable varying dimension
    filled = torch.ones(3, 4)
    for criterion in ("cog", "entropy"):
        scores, varying = exact_scores(states, filled, criterion)
        assert varying.tolist() == [False, True, True, False]
        assert select_focus(scores, varying, 1).tolist() == [2]
        assert select_focus(scores, varying, 4).tolist() == [1, 2]  # fewer than k vary


@pytest.mark.parametrize(("criterion", "tolerance"), [("cog", 0.10), ("entropy", 0.15)])
def test_running_statistics_approximate_the_exact_ones_on_a_small_replay(criterion, tolerance):
    """The running form (moving averages of sampled batches) against the exact form over the whole replay: 64
    door-world episodes, 400 batches of 8 (decay 0.99). Measured (seeds 0, 1, 2): max relative difference of the
    scores 0.021, 0.072, 0.024 (cog) and 0.058, 0.054, 0.046 (entropy), the door as the focus set in every case; the
    tolerances are the bounds documented in docs/fim.md."""
    learner, _, buffer = _warmed_up(FimConfig(), batches=8)
    learner.replay_states.flush()
    exact, varying = exact_scores(*learner.replay_states.contents(), criterion)
    running = RunningDimensionStats(5, bins=20, decay=0.99)
    for _ in range(400):
        batch = buffer.sample(8)
        running.update(batch["state"], batch["filled"])
    approx, approx_varying = running.scores(criterion)
    assert torch.equal(varying, approx_varying)
    relative = ((approx - exact).abs() / exact.abs()).max().item()
    assert relative < tolerance, relative
    # the door is the focus set of both (a second dimension is a near tie of the x coordinates under "entropy")
    assert select_focus(exact, varying, 1).tolist() == select_focus(approx, approx_varying, 1).tolist() == [4]
    # and the learner uses the configured source
    learner.fim = FimConfig(criterion=criterion, statistics="running")
    learner.running = running
    torch.testing.assert_close(learner.dimension_scores(buffer.sample(8))[0], approx)


def test_the_eligibility_trace_decays_geometrically_and_restarts_every_episode():
    influence = torch.zeros(2, 7, 1, 1)
    influence[0, 0], influence[0, 3], influence[1, 2] = 1.0, 2.0, 5.0
    filled = torch.ones(2, 7)
    filled[1, 5:] = 0
    influence[1, 5] = 100.0  # on padding: adds nothing
    traces = eligibility_traces(influence, filled, 0.9)[..., 0, 0]
    t = torch.arange(7.0)
    expected0 = 0.9**t + torch.where(t >= 3, 2.0 * 0.9 ** (t - 3), torch.zeros(7))
    torch.testing.assert_close(traces[0], expected0)
    torch.testing.assert_close(traces[1, :5], torch.tensor([0, 0, 5, 4.5, 4.05]))
    assert traces[1, 5] == pytest.approx(0.9 * 4.05) and traces[1, 6] == pytest.approx(0.81 * 4.05)
    torch.testing.assert_close(eligibility_traces(influence, filled, 0.0)[0, :, 0, 0], influence[0, :, 0, 0])


def test_synchrony_rewards_dimensions_every_agent_influences():
    traces = torch.tensor([[[[1.0, 4.0], [0.0, 1.0]]]])  # (B=1, T=1, N=2, C=2): agent 1 does not touch dim 0
    assert synchronized_focus(traces, "min").item() == 1.0
    assert synchronized_focus(traces, "mean").item() == 3.0
    assert synchronized_focus(traces, "geometric").item() == pytest.approx(2.0, rel=1e-4)


def test_the_influence_is_the_counterfactual_change_of_the_forward_model():
    """A model whose dimension 0 is agent 0's action index: its influence is |a0 − mean of its available actions|."""

    class Known(torch.nn.Module):
        def forward(self, state, joint):
            out = torch.zeros(*state.shape)
            out[..., 0] = (joint[..., 0, :] * torch.arange(5.0)).sum(-1)
            return out

    actions = torch.tensor([[[4, 0], [1, 3]]])  # (B=1, T=2, N=2)
    avail = torch.ones(1, 2, 2, 5, dtype=torch.bool)
    avail[0, 1, 0, 3:] = False  # at t=1 agent 0 may only play 0, 1, 2: mean 1
    influence = counterfactual_influence(Known(), torch.zeros(1, 2, 5), actions, avail, torch.tensor([0]))
    torch.testing.assert_close(influence[0, :, :, 0], torch.tensor([[2.0, 0.0], [0.0, 0.0]]))


def test_the_forward_model_learns_the_door_world():
    learner, _, buffer = _warmed_up(FimConfig(model_updates=1))
    losses = [learner.fit_model(buffer.sample(16)) for _ in range(150)]
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])


def test_the_bonus_reaches_the_td_target():
    learner, _, buffer = _warmed_up(FimConfig(recompute_every=1, normalize=False))
    batch = buffer.sample(16)
    learner.train(batch, 48)  # focus set and a forward-model step
    for _ in range(20):
        learner.fit_model(buffer.sample(16))
    batch = batch.trimmed()
    filled = batch["filled"]

    def targets(beta: float, td_lambda: float = 0.0) -> torch.Tensor:
        other = copy.deepcopy(learner)
        other.fim = FimConfig(beta=beta, normalize=False)
        other.config = LearnerConfig(td_lambda=td_lambda)
        return other.td_loss(batch)[1]["targets"]

    raw = learner.raw_bonus(batch)
    assert (raw[filled > 0] > 0).any() and (raw[filled == 0] == 0).all()
    torch.testing.assert_close(targets(0.5) - targets(0.0), 0.5 * raw)  # one-step: the difference is the bonus
    zero = torch.zeros(filled.shape[0], filled.shape[1] + 1)
    expected = td_lambda_targets(0.5 * raw, batch["terminated"], filled, zero, 0.99, 0.6)
    torch.testing.assert_close(targets(0.5, 0.6) - targets(0.0, 0.6), expected)
    # normalized: beta times the raw bonus over its running std
    normalized = copy.deepcopy(learner)
    normalized.fim = FimConfig(beta=0.5)
    bonus = normalized.intrinsic_reward(batch)
    torch.testing.assert_close(bonus, 0.5 * raw / normalized.scale.std)
    # centered (ours): the running mean is subtracted on real steps, so a first batch's bonus averages to zero
    centered = copy.deepcopy(learner)
    centered.fim, centered.scale = FimConfig(beta=0.5, center=True), type(learner.scale)()
    bonus = centered.intrinsic_reward(batch)
    mean = float(raw[filled > 0].mean())
    torch.testing.assert_close(bonus, 0.5 * (raw - mean) * filled / centered.scale.std)
    assert abs(float(bonus[filled > 0].mean())) < 1e-5 and (bonus[filled == 0] == 0).all()
    # terminal tail (ours): a terminated step adds the traces' discounted tail, every other step is unchanged
    tail = copy.deepcopy(learner)
    tail.fim = FimConfig(terminal_tail=True)
    batch.data["terminated"] = torch.zeros_like(filled)
    end = int(raw[0].argmax())  # a step with a bonus: as if the first episode ended there
    assert raw[0, end] > 0
    batch.data["terminated"][0, end] = 1.0
    decay = 0.99 * 0.9
    expected = raw.clone()
    expected[0, end] *= 1 + decay / (1 - decay)
    torch.testing.assert_close(tail.raw_bonus(batch), expected)


def test_training_updates_every_part_and_restores():
    learner, runner, buffer = _warmed_up(FimConfig(recompute_every=2))
    before = [p.detach().clone() for p in learner.model.parameters()]
    for k in range(3):
        stats = learner.train(buffer.sample(8), 48 + k)
    assert {"loss", "fim_bonus", "fim_model_loss", "focus_size"} <= set(stats) and len(learner.focus_history) == 2
    assert all(not torch.equal(p, q) for p, q in zip(learner.model.parameters(), before, strict=True))
    assert learner.test_stats(runner) == {"focus": [4]}
    runner.run(epsilon=1.0)  # a runner batch not yet flushed by a train call: a checkpoint must keep it
    restored, _, _ = _warmed_up(FimConfig(recompute_every=2), batches=1, seed=3)
    restored.load_training_state(learner.training_state())
    assert restored.replay_states.count == learner.replay_states.count == 56
    assert torch.equal(restored.focus, learner.focus) and restored.focus_history == learner.focus_history
    assert torch.equal(restored.replay_states.contents()[0], learner.replay_states.contents()[0])
    assert restored.scale.state() == learner.scale.state()


def test_fim_config_is_validated():
    bad = {"criterion": "variance", "trace_decay": 1.0, "statistics": "window", "synchrony": "max",
           "recompute_every": 0, "focus_fraction": 0.0, "focus_dims": [-1]}  # fmt: skip
    for field, value in bad.items():
        with pytest.raises(ConfigError, match=field):
            FimConfig(**{field: value})
    with pytest.raises(ConfigError, match="focus_dims.*state size 5"):
        _warmed_up(FimConfig(focus_dims=(5,)), batches=1)


def test_a_fixed_focus_set_replaces_the_selection():
    learner, _, buffer = _warmed_up(FimConfig(recompute_every=1, focus_dims=[1]))
    learner.train(buffer.sample(8), 48)
    assert learner.focus.tolist() == [1] and learner.focus_history == [[1]]  # the selection would pick the door (4)


@pytest.mark.parametrize("recipe", ["fim-door", "qmix-door"])
def test_the_recipes_run_end_to_end(recipe, tmp_path):
    from leantrain.config import resolve
    from leantrain.marl.learners import LEARNERS
    from leantrain.runs.launch import run

    assert "fim" in LEARNERS
    small = ["marl.max_steps=400", "marl.eval_every=400", "marl.test_episodes=2", "marl.batch_episodes=4",
             "marl.n_envs=2", "progress=none", f"output_dir={tmp_path}"]  # fmt: skip
    result = run(resolve(recipe, small))
    assert result.summary["t_env"] >= 400 and result.summary["updates"] > 0
    assert result.summary["algo"] == ("fim" if recipe.startswith("fim") else "qmix")
    fim, qmix = resolve("fim-door", []).marl, resolve("qmix-door", []).marl
    differ = {k for k in vars(fim) if getattr(fim, k) != getattr(qmix, k)}
    assert differ == {"algo", "method_options"}  # the anchor differs in the learner only
