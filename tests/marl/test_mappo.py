"""MAPPO on the core: GAE, the clipped objective, masks and padding, learning a matrix game, runs and resume."""

import copy
import json
import statistics

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run_cli
from leantrain.config import resolve
from leantrain.errors import ConfigError
from leantrain.marl import EnvInfo, EpisodeBatch, EpisodeRunner, LearnerConfig, MultiAgentController, make_env
from leantrain.marl.controller import masked_log_softmax, sample_policy
from leantrain.marl.mappo import MappoConfig, MappoLearner, ppo_losses
from leantrain.marl.networks import PerAgent
from leantrain.marl.targets import gae_advantages
from leantrain.runs.launch import run


def test_gae_matches_a_hand_computation_with_termination_truncation_and_padding():
    # three episodes, rewards [1, 2, 3] and values V0..V3 = [0.5, 1, 1.5, 2]: truncated after 3 steps (bootstrap
    # from V3), terminated at step 3 (no bootstrap), truncated after 2 steps (bootstrap from V2; padding after)
    rewards = torch.tensor([[1.0, 2, 3], [1, 2, 3], [1, 2, 99]])
    values = torch.tensor([[0.5, 1, 1.5, 2], [0.5, 1, 1.5, 2], [0.5, 1, 1.5, 7]])
    terminated = torch.tensor([[0.0, 0, 0], [0, 0, 1], [0, 0, 0]])
    filled = torch.tensor([[1.0, 1, 1], [1, 1, 1], [1, 1, 0]])
    adv, returns = gae_advantages(rewards, terminated, filled, values, gamma=0.9, lam=0.8)
    # d2 = 3 + .9 * 2 - 1.5 = 3.3; d1 = 2 + .9 * 1.5 - 1 = 2.35; d0 = 1 + .9 * 1 - .5 = 1.4; gamma * lam = .72
    truncated = [1.4 + 0.72 * (2.35 + 0.72 * 3.3), 2.35 + 0.72 * 3.3, 3.3]
    ended = [1.4 + 0.72 * (2.35 + 0.72 * 1.5), 2.35 + 0.72 * 1.5, 3 - 1.5]
    short = [1.4 + 0.72 * 2.35, 2.35, 0.0]
    expected = torch.tensor([truncated, ended, short])
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.allclose(returns, expected + values[:, :-1], atol=1e-5)
    # lambda = 1, gamma = 1: the advantage is the Monte-Carlo return to go minus V
    adv1, _ = gae_advantages(rewards[1:2], terminated[1:2], filled[1:2], values[1:2], gamma=1.0, lam=1.0)
    assert torch.allclose(adv1, torch.tensor([[6 - 0.5, 5 - 1, 3 - 1.5]]))


def _losses(logp, adv, config=None):
    """ppo_losses with old log-probabilities 0 (ratio = exp(logp)) and a dummy critic; logp, adv (1, T)."""
    t = logp.shape[1]
    zeros = torch.zeros(1, t)
    return ppo_losses(logp.unsqueeze(-1), zeros.unsqueeze(-1), adv, zeros.unsqueeze(-1), zeros, zeros, zeros,
                      torch.ones(1, t), config or MappoConfig())  # fmt: skip


def test_clipped_objective_has_no_gradient_beyond_the_clip_in_the_advantage_direction():
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1]])  # clip 0.2: the range is [0.8, 1.2]
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])
    logp = ratios.log().requires_grad_()
    _losses(logp, adv)["policy"].backward()
    grad = logp.grad[0]
    # beyond 1 + eps with A > 0 and below 1 - eps with A < 0: no incentive to move further, gradient exactly 0
    assert grad[0] == 0 and grad[1] == 0
    # the other sides (and inside the range) keep the unclipped gradient -ratio * A / (agent-steps)
    assert torch.allclose(grad[2:], -(ratios[0, 2:] * adv[0, 2:]) / 5)
    # the clip fraction counts the ratios outside [0.8, 1.2]
    assert _losses(ratios.log(), adv)["clip_fraction"].item() == pytest.approx(4 / 5)


def test_value_loss_is_huber_and_clipped_around_the_old_value():
    config = MappoConfig(clip=0.2, huber_delta=1.0)
    old, target = torch.zeros(1, 2), torch.tensor([[0.5, 3.0]])
    values = torch.tensor([[1.0, 3.0]])  # moved by 1.0 from the old value: the clipped prediction is 0.2
    zeros, filled = torch.zeros(1, 2, 1), torch.ones(1, 2)
    loss = ppo_losses(zeros, zeros, torch.zeros(1, 2), zeros, values, old, target, filled, config)["value"]
    # step 0: max(huber(0.5), huber(-0.3)) = 0.125; step 1: max(huber(0), huber(-2.8) = 2.8 - 0.5) = 2.3
    assert loss.item() == pytest.approx((0.125 + 2.3) / 2)
    plain = MappoConfig(clip=0.2, huber_delta=None, clip_value=False)
    loss = ppo_losses(zeros, zeros, torch.zeros(1, 2), zeros, values, old, target, filled, plain)["value"]
    assert loss.item() == pytest.approx((0.5 * 0.25 + 0) / 2)


def test_unavailable_actions_get_zero_probability_and_are_never_sampled():
    torch.manual_seed(0)
    logits = torch.randn(64, 3, 5, requires_grad=True)
    avail = torch.rand(64, 3, 5) < 0.5
    avail[..., 2] = True  # at least one available action per agent
    logp = masked_log_softmax(logits, avail)
    probs = logp.exp()
    assert (probs[~avail] == 0).all() and torch.allclose(probs.sum(-1), torch.ones(64, 3))
    # an unavailable action's logit does not move the policy over the available ones
    (logp * avail).sum().backward()
    assert (logits.grad[~avail] == 0).all()
    rng = np.random.default_rng(0)
    draws = torch.stack([sample_policy(logits.detach(), avail, 0.0, rng, torch.Generator().manual_seed(i))
                         for i in range(50)])  # fmt: skip
    assert avail.gather(-1, draws.permute(1, 2, 0)).all()


def _info(n_agents=2, n_actions=3):
    return EnvInfo(n_agents=n_agents, n_actions=n_actions, obs_dim=4, state_dim=6, episode_limit=4)


def _batch(info, lengths, terminated_last):
    """A random batch of episodes of the given lengths, padded to the limit (like the runner's)."""
    b, limit, n, k = len(lengths), info.episode_limit, info.n_agents, info.n_actions
    g = torch.Generator().manual_seed(1)
    filled = torch.tensor([[1.0 if t < length else 0.0 for t in range(limit)] for length in lengths])
    terminated = torch.zeros(b, limit)
    for i, length in enumerate(lengths):
        terminated[i, length - 1] = float(terminated_last[i])
    avail = torch.rand(b, limit + 1, n, k, generator=g) < 0.7
    avail[..., 0] = True
    actions = torch.multinomial(avail[:, :-1].float().reshape(-1, k), 1, generator=g).view(b, limit, n)
    return EpisodeBatch({
        "obs": torch.randn(b, limit + 1, n, info.obs_dim, generator=g),
        "state": torch.randn(b, limit + 1, info.state_dim, generator=g), "avail": avail, "actions": actions,
        "reward": torch.randn(b, limit, generator=g) * filled,
        "terminated": terminated, "filled": filled,
    })  # fmt: skip


def test_padding_steps_contribute_nothing_to_an_update():
    info = _info()
    torch.manual_seed(0)
    learner = MappoLearner(MultiAgentController(info, hidden=8, last_action=False), LearnerConfig(optimizer="adam"),
                           MappoConfig(ppo_epoch=2, num_mini_batch=2, critic_hidden=8))  # fmt: skip
    twin = copy.deepcopy(learner)
    batch = _batch(info, lengths=[4, 2, 3], terminated_last=[False, True, False])
    garbage = EpisodeBatch({k: v.clone() for k, v in batch.data.items()})
    g = torch.Generator().manual_seed(7)
    for i, length in enumerate([4, 2, 3]):  # steps >= length and slots > length are padding
        garbage.data["reward"][i, length:] = 50 * torch.randn(4 - length, generator=g)
        garbage.data["actions"][i, length:] = 0
        garbage.data["obs"][i, length + 1 :] = 9.0
        garbage.data["state"][i, length + 1 :] = -9.0
    a, b = learner.train(batch, 3), twin.train(garbage, 3)
    assert a == b
    for x, y in zip(learner.state_dict().values(), twin.state_dict().values(), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_per_agent_policies_are_separate_networks_with_the_controllers_interface():
    info = _info(n_agents=3)
    torch.manual_seed(0)
    mac = MultiAgentController(info, hidden=8, last_action=False, shared=False)
    assert isinstance(mac.agent, PerAgent) and len(mac.agent.agents) == 3
    obs, actions = torch.randn(2, 4, 3, 4), torch.randint(0, 3, (2, 3, 3))
    unrolled = mac.unroll(obs, actions)  # (B, T+1, N, A)
    h = mac.init_hidden(2)
    for t in range(4):
        q, h = mac.step(obs[:, t], None, h)
        assert torch.allclose(q, unrolled[:, t], atol=1e-6)
    unrolled[:, :, 1].sum().backward()  # agent 1's outputs reach only agent 1's network
    touched = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters()) for a in mac.agent.agents]
    assert touched == [False, True, False]


def test_mappo_learns_the_climbing_game_from_a_random_start():
    """A random joint policy earns -31/9 on climbing; MAPPO settles on a good cell (the safe 5 or better) in 60
    updates."""
    torch.manual_seed(0)
    envs = [make_env("matrix:climbing") for _ in range(16)]
    mac = MultiAgentController(envs[0].info, hidden=16, last_action=False)
    learner = MappoLearner(mac, LearnerConfig(optimizer="adam", lr=5e-3), MappoConfig(ppo_epoch=4, critic_hidden=16))
    runner = EpisodeRunner(envs, mac, seed=0)
    learner.attach(runner)
    returns = []
    for update in range(60):
        batch, stats = runner.run(learner.collection_epsilon(0, 1.0))
        if update == 0:  # the runner samples from the policy: the 16 environments do not all play one joint action
            assert len({tuple(a) for a in batch["actions"][:, 0].tolist()}) > 1
        returns.append(statistics.fmean(stats.returns))
        learner.train(batch, 0)
    assert statistics.fmean(returns[:3]) < 0 < 4 < statistics.fmean(returns[-3:])
    assert runner.test_return(1) in (5.0, 6.0, 7.0, 11.0)


SMALL = ["marl.eval_every=300", "marl.test_episodes=2", "marl.batch_episodes=12", "marl.log_every_episodes=16",
         "progress=none", "marl.env=matrix:climbing", "marl.env_args={}", "marl.agent_hidden=8",
         "marl.method_options={ppo_epoch: 2, critic_hidden: 8}"]  # fmt: skip


def test_resumed_mappo_run_equals_the_uninterrupted_run(tmp_path):
    """The rollout's held episodes, the sampling generator and the minibatch shuffle survive a checkpoint."""
    base = [*SMALL, f"output_dir={tmp_path}"]
    whole = run(resolve("mappo-simple-spread", [*base, "marl.max_steps=1200"]))
    # stops; its checkpoint at t = 600 holds 8 collected episodes not yet trained on (12 per update, 8 per batch)
    cut = run(resolve("mappo-simple-spread", [*base, "marl.max_steps=700"]))
    resumed = run(resolve("mappo-simple-spread", [*base, "marl.max_steps=1200", f"resume={cut.run_dir}"]))
    a, b = load_file(str(whole.run_dir / "model.safetensors")), load_file(str(resumed.run_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(x) for x in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in again if r["split"] != "resume"] == records
    # every second batch of 8 brings the rollout to >= 12 episodes: 75 updates on 16 episodes each
    assert resumed.summary["updates"] == whole.summary["updates"] == 75
    # the attacks of `leantrain attack` need a value decomposition's mixer: a clear refusal, not a traceback
    from leantrain.marl.robustness import evaluate_attacks

    with pytest.raises(ConfigError, match="value-decomposition run"):
        evaluate_attacks(whole.run_dir, episodes=1)


def test_bad_mappo_options_are_refused(tmp_path):
    out = f"output_dir={tmp_path}"
    with pytest.raises(ConfigError, match="unexpected keyword argument 'clip_ratio'"):
        run(resolve("mappo-simple-spread", [*SMALL, out, "marl.method_options={clip_ratio: 0.1}"]))
    with pytest.raises(ConfigError, match=r"MAPPO clip=1.5 must be in \(0, 1\)"):
        run(resolve("mappo-simple-spread", [*SMALL, out, "marl.method_options={clip: 1.5}"]))
    with pytest.raises(ConfigError, match="num_mini_batch=16 needs marl.batch_episodes >= it"):
        run(resolve("mappo-simple-spread", [*SMALL, out, "marl.method_options={num_mini_batch: 16}"]))


def test_mappo_simple_spread_recipe_runs_through_the_cli(tmp_path, capsys):
    pytest.importorskip("mpe2")
    code, out, err = run_cli(capsys, "run", "mappo-simple-spread", "marl.max_steps=400", "marl.eval_every=200",
                             "marl.test_episodes=2", "marl.n_envs=4", "marl.batch_episodes=4",
                             "marl.log_every_episodes=4", "marl.method_options={ppo_epoch: 2}", "progress=none",
                             f"output_dir={tmp_path}")  # fmt: skip
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["algo"] == "mappo" and summary["mixer"] is None
    assert summary["t_env"] == 400 and summary["updates"] == 4  # 16 episodes of 25 steps, 4 per update
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert train and all("policy_loss" in r and "entropy" in r and "epsilon" not in r for r in train)
    assert [r["t_env"] for r in records if r["split"] == "test"] == [0, 200, 400]
    weights = load_file(str(run_dir / "model.safetensors"))
    assert {k.split(".")[0] for k in weights} == {"mac", "critic"}
    assert "critic.norm.mean" in weights  # the value normaliser's statistics travel with the policy
