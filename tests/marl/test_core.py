"""The MARL core: mixers, TD(lambda), masks, replay, environments, reproducibility."""

from importlib.util import find_spec

import numpy as np
import pytest
import torch

from leantrain.marl import (
    EpisodeRecorder,
    EpisodeRunner,
    EpsilonSchedule,
    MultiAgentController,
    QMixer,
    ReplayBuffer,
    VDNMixer,
    epsilon_greedy,
    make_env,
    make_matrix_game,
    td_lambda_targets,
)
from leantrain.marl.env import EnvInfo


def test_qmix_is_monotonic_in_every_agent_q():
    torch.manual_seed(0)
    mixer = QMixer(n_agents=3, state_dim=5)
    qs = torch.randn(4, 6, 3, requires_grad=True)
    states = torch.randn(4, 6, 5)
    mixer(qs, states).sum().backward()
    assert (qs.grad >= 0).all()
    # raising one agent's Q never lowers Q_tot
    higher = qs.detach().clone()
    higher[..., 1] += torch.rand(4, 6)
    assert (mixer(higher, states) >= mixer(qs.detach(), states) - 1e-6).all()


def test_vdn_is_additive():
    qs = torch.randn(2, 3, 4)
    torch.testing.assert_close(VDNMixer()(qs), qs.sum(-1))


def test_td_lambda_matches_a_hand_computation():
    g, lam = 0.9, 0.5
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    terminated = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # row 0 truncated at the limit, row 1 ends at t=0
    filled = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.5, 1.0, 2.0, 4.0], [9.0, 9.0, 9.0, 9.0]])
    out = td_lambda_targets(rewards, terminated, filled, q, g, lam)
    g2 = 3 + g * 4.0  # last step bootstraps from Q_3 (truncation)
    g1 = 2 + g * ((1 - lam) * 2.0 + lam * g2)
    g0 = 1 + g * ((1 - lam) * 1.0 + lam * g1)
    torch.testing.assert_close(out[0], torch.tensor([g0, g1, g2]))
    assert out[1, 0].item() == pytest.approx(1.0)  # terminated: no bootstrap
    one_step = td_lambda_targets(rewards, terminated, filled, q, g, 0.0)
    torch.testing.assert_close(one_step[0], rewards[0] + g * q[0, 1:])


def test_epsilon_greedy_respects_available_actions():
    rng = np.random.default_rng(0)
    q = torch.randn(64, 3, 5)
    q[..., 4] = 100.0  # the best action is unavailable
    avail = torch.ones(64, 3, 5, dtype=torch.bool)
    avail[..., 4] = False
    avail[:, 0, 1:] = False  # agent 0 may only do action 0
    for eps in (0.0, 0.5, 1.0):
        actions = epsilon_greedy(q, avail, eps, rng)
        assert avail.gather(-1, actions.unsqueeze(-1)).all()
        assert (actions[:, 0] == 0).all()
    schedule = EpsilonSchedule(1.0, 0.05, 100)
    assert schedule(0) == 1.0 and schedule(50) == pytest.approx(0.525) and schedule(10_000) == pytest.approx(0.05)


def test_environments_refuse_unavailable_actions():
    game = make_matrix_game("climbing")
    game.reset()
    with pytest.raises(ValueError, match="expected 2 actions"):
        game.step([0])
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        game.step([0, 3])


def test_recorder_pads_and_replay_samples_whole_episodes():
    info = EnvInfo(n_agents=2, n_actions=3, obs_dim=4, state_dim=5, episode_limit=6)
    buffer = ReplayBuffer(capacity=5, seed=0)
    for length in (2, 6, 3, 1, 4, 5, 6):
        rec = EpisodeRecorder(info)
        for t in range(length + 1):
            rec.add_observation(np.full((2, 4), t, np.float32), np.zeros(5, np.float32), np.ones((2, 3), bool))
        for _t in range(length):
            rec.add_step(np.array([0, 1]), 1.0, _t == length - 1)
        buffer.insert(rec.episode())
    assert len(buffer) == 5 and buffer.count == 7
    batch = buffer.sample(4)
    assert batch["obs"].shape == (4, 7, 2, 4) and batch["actions"].shape == (4, 6, 2)
    assert batch["avail"].shape == (4, 7, 2, 3) and batch["reward"].shape == (4, 6)
    lengths = batch["filled"].sum(1)
    assert ((batch["reward"] * batch["filled"]).sum(1) == lengths).all()
    trimmed = batch.trimmed()
    assert trimmed["obs"].shape[1] == int(lengths.max()) + 1 and trimmed["reward"].shape[1] == int(lengths.max())
    with pytest.raises(Exception, match="cannot sample 6"):
        buffer.sample(6)


def test_the_shifting_game_switches_its_optimum_on_training_episodes_only():
    from leantrain.marl.matrix_games import EpisodeClock

    clock = EpisodeClock()
    games = [make_matrix_game("shifting", 3, clock) for _ in range(2)]
    test_game = make_matrix_game("shifting", 3, clock, counts=False)
    optima = []
    for i in range(5):
        games[i % 2].reset()
        optima.append(games[i % 2].optimum())
        test_game.reset()  # tests read the clock, never advance it
        assert test_game.optimum() == optima[-1]
    assert optima[:3] == [((0, 0), 11.0)] * 3 and optima[3:] == [((2, 2), 11.0)] * 2
    assert clock.episodes == 5


def _train(seed):
    from leantrain.marl.learner import LearnerConfig, QLearner

    torch.manual_seed(seed)
    envs = [make_matrix_game("climbing") for _ in range(4)]
    mac = MultiAgentController(envs[0].info)
    learner = QLearner(mac, LearnerConfig(target_update_episodes=20))
    runner, buffer = EpisodeRunner(envs, mac, seed=seed), ReplayBuffer(100, seed=seed)
    for i in range(20):
        batch, _ = runner.run(epsilon=0.5)
        buffer.insert(batch)
        if buffer.can_sample(8):
            learner.train(buffer.sample(8), 4 * (i + 1))
    return [p.detach().clone() for p in mac.parameters()]


def test_a_seeded_run_is_reproducible():
    a, b, c = _train(0), _train(0), _train(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.skipif(find_spec("lbforaging") is None, reason="needs the marl extras")
def test_lbforaging_adapter_masks_and_runner():
    env = make_env("lbf:Foraging-8x8-2p-2f-coop-v3")
    assert env.info.n_agents == 2 and env.info.n_actions == 6 and env.info.episode_limit == 50
    mac = MultiAgentController(env.info)
    batch, stats = EpisodeRunner([env, make_env("lbf:Foraging-8x8-2p-2f-coop-v3")], mac, seed=0).run(epsilon=1.0)
    assert batch["obs"].shape == (2, 51, 2, 12) and stats.steps == sum(stats.lengths)
    steps = batch["filled"].bool()
    taken = batch["avail"][:, :-1].gather(-1, batch["actions"].unsqueeze(-1)).squeeze(-1)
    assert taken[steps].all()  # every executed action was available
