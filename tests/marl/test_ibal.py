"""IBAL: the observation layout, cross-group masking, budgeted action perturbation, the stored batch, the robust loss,
the attack suite and the recipe."""

import copy
import json

import numpy as np
import pytest
import torch

from leantrain.errors import ConfigError
from leantrain.marl import EpisodeRunner, MultiAgentController, make_env, make_matrix_game
from leantrain.marl.ibal import IBALConfig, IBALLearner
from leantrain.marl.ibal_attack import (
    IBALAttackConfig,
    InteractionBreakingAttack,
    OneAgentMissing,
    bipartitions,
    cross_group,
    observation_layout,
    worst_actions,
)
from leantrain.marl.learner import LearnerConfig, QLearner

pytest.importorskip("lbforaging")
ENV = "lbf:Foraging-8x8-4p-3f-v3"  # the recipe's task: 3 food triples, then 4 player blocks of (y, x, level)


def _env():
    return make_env(ENV, max_episode_steps=25)


def _setup(attack: IBALAttackConfig | None = None, envs: int = 2, seed: int = 0, share: float = 1.0):
    torch.manual_seed(seed)
    env_list = [_env() for _ in range(envs)]
    mac = MultiAgentController(env_list[0].info, hidden=16)
    learner = IBALLearner(
        mac, LearnerConfig(), IBALConfig(attacked_episodes=share, attack=attack or IBALAttackConfig())
    )
    runner = EpisodeRunner(env_list, mac, seed=seed)
    learner.attach(runner)
    return runner, learner


def _expected_masked(layout, batch) -> torch.Tensor:
    """The environment's observations with the recorded cut applied (slots 0..T-1), computed independently."""
    env_obs = batch["env_obs"][:, :-1].numpy()  # (B, T, N, O)
    b, t, n, o = env_obs.shape
    group = batch["step_group"].numpy().astype(bool)  # (B, T, N)
    on = batch["step_masked"].numpy().any(-1)  # (B, T)
    cut = cross_group(group) & on[..., None, None]  # (B, T, N, N)
    return torch.as_tensor(layout.mask(env_obs.reshape(b * t, n, o), cut.reshape(b * t, n, n)).reshape(b, t, n, o))


def test_the_lbf_layout_puts_every_other_agent_where_its_own_block_says():
    env = _env()
    layout = observation_layout(env)
    start, n = 3 * 3, env.info.n_agents
    for seed in range(3):
        obs = env.reset(seed=seed).obs  # (N, O)
        for i in range(n):
            assert set(layout.blocks[i]) == set(range(n)) - {i}
            for j, where in layout.blocks[i].items():
                np.testing.assert_array_equal(obs[i, where], obs[j, start : start + 3])  # agent j's view of itself
    np.testing.assert_allclose(layout.absent, [-1 / 8, -1 / 8, 0])  # LBF's "not seen", scaled like the observation
    with pytest.raises(ConfigError, match="sight"):
        observation_layout(make_env("lbf:Foraging-2s-8x8-2p-2f-coop-v3"))
    with pytest.raises(ConfigError, match="only LBF"):
        observation_layout(make_matrix_game("climbing"))


def test_masking_changes_exactly_the_other_group_blocks_and_nothing_else():
    runner, _ = _setup(IBALAttackConfig(attack_prob=1.0, budget=25, action_agents=0))
    layout = observation_layout(runner.envs[0])
    batch, _ = runner.run(epsilon=0.3)
    assert batch["step_masked"].sum() > 0
    torch.testing.assert_close(batch["obs"][:, :-1], _expected_masked(layout, batch), rtol=0, atol=0)
    # per observation: only other-agent features can change, and a changed block is the "absent" encoding
    own = np.ones(runner.info.obs_dim, bool)
    for where in layout.blocks[0].values():  # the same positions for every agent
        own[where] = False
    changed = (batch["obs"] != batch["env_obs"]).numpy()  # (B, T+1, N, O)
    assert not changed[..., own].any()  # food and the agent's own block are never touched
    group = batch["step_group"].numpy().astype(bool)
    for b, t, i in zip(*np.nonzero(batch["step_masked"].numpy()), strict=True):
        cross = [j for j in range(4) if j != i and group[b, t, j] != group[b, t, i]]
        assert cross  # a masked agent lost at least one other group's agent
        for j in cross:
            np.testing.assert_array_equal(batch["obs"][b, t, i, layout.blocks[i][j]].numpy(), layout.absent)
        for j in set(range(4)) - set(cross) - {i}:  # its own group stays visible
            assert torch.equal(
                batch["obs"][b, t, i, layout.blocks[i][j]], batch["env_obs"][b, t, i, layout.blocks[i][j]]
            )


@pytest.mark.parametrize("budget", [0, 1, 5])
@pytest.mark.parametrize("rule", ["worst", "random"])
def test_action_perturbation_respects_the_budget_and_available_actions(budget, rule):
    config = IBALAttackConfig(budget=budget, test_budget=budget, attack_prob=1.0, action_agents=2, action_rule=rule)
    runner, learner = _setup(config)
    for test in (False, True):
        batch, _ = runner.run(epsilon=0.3, test=test)
        real = batch["filled"].bool()
        attacked, masked = batch["step_attacked"].bool(), batch["step_masked"].bool()
        steps = (attacked.any(-1) | masked.any(-1)).sum(1)
        assert (steps == min(budget, 25)).all() if budget else (steps == 0).all()  # attack_prob 1: the whole budget
        assert (attacked.sum(-1) <= 2).all()
        executed, intended, avail = batch["step_executed"].long(), batch["actions"], batch["avail"][:, :-1]
        assert avail.gather(-1, executed.unsqueeze(-1))[real].all()  # every executed action was available
        assert ((executed != intended) <= attacked).all()  # only perturbed agents deviate
        if rule == "worst":
            with torch.no_grad():
                q = learner.mac.unroll(batch["obs"], batch["actions"])[:, :-1]
            hit = real[..., None] & attacked
            assert torch.equal(executed[hit], worst_actions(q, avail)[hit])


def test_greedy_groups_cut_the_strongest_interaction(monkeypatch):
    from leantrain.marl import ibal_attack

    assert len(bipartitions(4)) == 7 and len({tuple(r) for r in bipartitions(4).tolist()}) == 7
    d = np.zeros((4, 4))
    d[0, 1] = d[1, 0] = 5.0  # agents 0 and 1 depend on each other, the others barely
    d[2, 3] = 0.1
    monkeypatch.setattr(
        ibal_attack, "interaction_matrix", lambda mac, layout, obs, *a: np.repeat(d[None], len(obs), 0)
    )
    runner, _ = _setup(IBALAttackConfig(attack_prob=1.0, budget=3, action_agents=1), envs=1)
    batch, _ = runner.run(epsilon=0.0)
    group = batch["step_group"][0, :3].bool()
    assert (group[:, 0] != group[:, 1]).all() and (group[:, 2] != group[:, 3]).all()  # both links cut
    assert (batch["step_attacked"][0, :3, :2].sum(-1) == 1).all()  # the perturbed agent is 0 or 1


def test_the_batch_keeps_attacked_and_environment_observations_and_intended_actions():
    runner, learner = _setup(IBALAttackConfig(attack_prob=1.0, budget=12))
    batch, _ = runner.run(epsilon=0.0)
    assert {"obs", "env_obs", "step_executed", "step_masked"} <= set(batch.data)
    assert not torch.equal(batch["obs"], batch["env_obs"])
    executed, intended = batch["step_executed"].long(), batch["actions"]
    assert (executed != intended).any()  # the environment executed the perturbed actions ...
    with torch.no_grad():  # ... while the replay holds the greedy choices on the masked observations
        q = learner.mac.unroll(batch["obs"], batch["actions"])[:, :-1]
    real = batch["filled"].bool()
    assert torch.equal(q.masked_fill(~batch["avail"][:, :-1], -1e9).argmax(-1)[real], intended[real])


def test_training_mixes_clean_and_attacked_episodes_after_clean_steps():
    runner, learner = _setup(IBALAttackConfig(attack_prob=1.0), envs=8, share=0.5)
    learner.ibal.clean_steps = 100
    assert learner.collection_epsilon(0, 0.7) == 0.7 and not learner.attack_hook.enabled
    batch, _ = runner.run(epsilon=0.7)
    assert batch["step_masked"].sum() == 0  # clean training before clean_steps
    assert learner.collection_epsilon(100, 0.7) == 0.0 and learner.attack_hook.enabled
    attacked = torch.cat([runner.run(epsilon=0.0)[0]["step_masked"].sum((1, 2)) > 0 for _ in range(3)])
    assert 0 < int(attacked.sum()) < len(attacked)  # some of the 24 episodes clean, some attacked


def test_the_robust_loss_trains_on_the_attacked_transitions():
    """Fails if the adversary is bypassed: the TD loss must read the masked observations, and the consistency loss
    must compare them with the environment's."""
    runner, learner = _setup(IBALAttackConfig(attack_prob=1.0, budget=12))
    batch = runner.run(epsilon=0.5)[0].trimmed()
    layout = observation_layout(runner.envs[0])
    plain = QLearner(learner.mac, LearnerConfig())
    plain.mixer, plain.target_mac, plain.target_mixer = learner.mixer, learner.target_mac, learner.target_mixer

    def loss_on(obs):
        swapped = copy.copy(batch)
        swapped.data = {**batch.data, "obs": obs}
        return plain.td_loss(swapped)[0]

    expected = batch["obs"].clone()
    expected[:, :-1] = _expected_masked(layout, batch)
    loss, context = learner.td_loss(batch)
    assert torch.equal(loss, loss_on(expected))  # the adversary's observations are what the loss reads
    assert not torch.allclose(loss, loss_on(batch["env_obs"]))  # bypassing it changes the loss
    extra = learner.extra_losses(batch, context)["loss_consistency"]
    assert extra > 0
    clean = copy.copy(batch)
    clean.data = {**batch.data, "obs": batch["env_obs"]}
    assert learner.extra_losses(clean, learner.td_loss(clean)[1])["loss_consistency"] == 0
    stats = learner.train(batch, 2)
    assert stats["loss"] == pytest.approx(loss.item()) and stats["loss_consistency"] == pytest.approx(extra.item())


def test_one_agent_missing_holds_one_agent_on_noop_for_the_whole_episode():
    env_list = [_env() for _ in range(4)]
    mac = MultiAgentController(env_list[0].info, hidden=16)
    runner = EpisodeRunner(env_list, mac, seed=0)
    OneAgentMissing(runner, seed=0)
    batch, _ = runner.run(epsilon=1.0)
    real = batch["filled"].bool()
    executed, chosen = batch["step_executed"].long(), batch["actions"]
    noop = (executed == 0) & real[..., None]
    held = noop.sum(1) == real.sum(1, keepdim=True)  # (B, N): agents on NOOP at every real step
    assert (held.sum(-1) >= 1).all()
    for b in range(4):
        missing = int(held[b].nonzero()[0, 0]) if held[b].sum() == 1 else None
        if missing is not None:
            others = [i for i in range(4) if i != missing]
            assert torch.equal(executed[b][real[b]][:, others], chosen[b][real[b]][:, others])


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="action_rule"):
        IBALAttackConfig(action_rule="nice")
    with pytest.raises(ConfigError, match="attack_prob"):
        IBALAttackConfig(attack_prob=2.0)
    with pytest.raises(ConfigError, match="unknown"):
        IBALConfig.from_options({"bugdet": 3})
    assert IBALConfig.from_options({"budget": 3, "consistency": 0.0}).attack.budget == 3
    with pytest.raises(ConfigError, match="only LBF"):
        env = make_matrix_game("climbing")
        InteractionBreakingAttack(EpisodeRunner([env], MultiAgentController(env.info)), MultiAgentController(env.info),
                                  IBALAttackConfig())  # fmt: skip


def test_recipe_runs_end_to_end_and_the_attack_suite_evaluates_ibal_and_one_agent_missing(tmp_path):
    from leantrain.config import resolve
    from leantrain.marl.learners import LEARNERS
    from leantrain.marl.robustness import ATTACKS, evaluate_attacks
    from leantrain.runs.launch import run

    assert "ibal" in LEARNERS
    assert {"clean", "wolfpack", "random", "ibal", "one_agent_missing"} <= set(ATTACKS)
    small = ["marl.max_steps=100", "marl.eval_every=50", "marl.test_episodes=2", "marl.batch_episodes=2",
             "marl.log_every_episodes=1", "progress=none", f"output_dir={tmp_path}"]  # fmt: skip
    result = run(resolve("ibal-lbf-4p", small))
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in records if r.get("split") == "test"]
    assert tests and all("ibal_return_mean" in r for r in tests)
    assert any("loss_consistency" in r for r in records)
    out = evaluate_attacks(result.run_dir, episodes=2, fit_episodes=2, fit_updates=1)
    assert list(out) == list(ATTACKS)  # every registered condition, in the suite's order
    assert all(0.0 <= v <= 1.0 for v in out.values())
    only = evaluate_attacks(result.run_dir, episodes=2, attacks=["ibal", "one_agent_missing"])
    assert list(only) == ["ibal", "one_agent_missing"] and only["ibal"] == out["ibal"]  # same seeds, same numbers
    with pytest.raises(ConfigError, match="unknown attack"):
        evaluate_attacks(result.run_dir, episodes=2, attacks=["nope"])
    with pytest.raises(ConfigError, match="method_options for ibal"):
        run(resolve("ibal-lbf-4p", [*small, "marl.method_options={bugdet: 3}"]))
