"""SBC (state-blocked coordination): the blocking wrapper (exact penalty, hard blocking, the empty set), the sampler of
blocking sets, the multi-destination task, frozen partners through the runner's action hook (exact actions, no
gradient into the ego), conventions and cross-play of self-play MAPPO, policy snapshots, and the whole pipeline on a
tiny budget."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from leantrain.config import resolve
from leantrain.errors import ConfigError
from leantrain.marl import EpisodeRunner, LearnerConfig, MappoConfig, MappoLearner, MultiAgentController, make_env
from leantrain.marl.controller import greedy
from leantrain.marl.multi_destination import MultiDestinationSpread
from leantrain.marl.partners import PartnerHook, PolicyPartner, ScriptedPartner, crossplay, load_partner
from leantrain.marl.sbc import run_job
from leantrain.marl.sbc_blocking import BlockedEnv, sample_blocking_sets
from leantrain.runs.kinds import kind_of
from leantrain.runs.launch import run

STAY, UP, DOWN, LEFT, RIGHT = range(5)
TINY = ["marl.max_steps=120", "marl.n_envs=4", "marl.batch_episodes=4", "marl.test_episodes=2", "marl.eval_every=1000",
        "marl.env_args={size: 3, episode_limit: 4}", "marl.agent_hidden=8", "marl.method_options={ppo_epoch: 1}",
        "progress=none"]  # fmt: skip
TINY_SBC = [*TINY, "sbc.partner_steps=120", "sbc.held_out_seeds=1", "sbc.population=3", "sbc.crossplay_episodes=2"]


def _random_actions(seed, steps, n=2, k=5):
    return np.random.default_rng(seed).integers(k, size=(steps, n))


def _lockstep(real, blocked, actions):
    """Step both environments with the same actions (resetting both at an episode's end); the step pairs."""
    real.reset(seed=0), blocked.reset(seed=0)
    pairs = []
    for a in actions:
        r, b = real.step(a), blocked.step(a)
        pairs.append((r, b, [tuple(p) for p in real.positions]))
        if r.terminated or r.truncated:
            real.reset(seed=0), blocked.reset(seed=0)
    return pairs


# ---------------------------------------------------------------- the multi-destination task


def test_multi_destination_pays_only_when_both_agents_meet_at_the_same_destination():
    env = make_env("grid:multi_destination", size=5, destinations=4, episode_limit=12)
    assert env.destinations == ((0, 0), (4, 4), (4, 0), (0, 4)) and env.info.obs_dim == 12
    o = env.reset(seed=3)
    assert env.positions == [(2, 2), (2, 2)] and np.allclose(o.obs[0, 2:4], 0)  # the partner on the same cell
    # agent 0 to the top-left corner (destination 0) alone: nothing while agent 1 stays on the centre
    steps = [env.step([a, STAY]) for a in (UP, UP, LEFT, LEFT)]
    assert [s.reward for s in steps] == [0.0] * 4 and not any(s.terminated for s in steps)
    assert np.allclose(steps[-1].observation.obs[0, 4:6], 0)  # its offset to destination 0 is (0, 0)
    # agent 1 to another corner (bottom-right): both on destinations, different ones: still nothing
    steps = [env.step([STAY, a]) for a in (DOWN, DOWN, RIGHT, RIGHT)]
    assert env.positions == [(0, 0), (4, 4)] and all(s.reward == 0.0 for s in steps)
    env.reset()  # both on the same cell that is not a destination (the centre, moving off-grid is a stay)
    assert env.step([STAY, STAY]).reward == 0.0
    # both reach destination 2 (top-right) together: reward 1 and the episode ends at that step
    steps = [env.step([a, a]) for a in (UP, UP, RIGHT, RIGHT)]
    assert [s.reward for s in steps] == [0.0, 0.0, 0.0, 1.0] and steps[-1].terminated and not steps[-1].truncated
    assert steps[-1].info["destination"] == 2
    env.reset()  # nobody meets: truncated at the limit, never terminated
    steps = [env.step([UP, DOWN]) for _ in range(12)]
    assert steps[-1].truncated and not any(s.terminated or s.reward for s in steps)
    with pytest.raises(ConfigError, match="odd integer"):
        make_env("grid:multi_destination", size=4)
    with pytest.raises(ConfigError, match="unknown grid world"):
        make_env("grid:nope")


# ---------------------------------------------------------------- blocking


def test_the_blocking_penalty_is_exactly_c_on_blocked_states_and_the_real_reward_is_untouched():
    c, blocked_dest = 0.7, (0, 0)
    real = MultiDestinationSpread(size=3, episode_limit=6)
    blocked = make_env("blocked:grid:multi_destination", size=3, episode_limit=6,
                       blocked_units=[["destination", 0]], block_penalty=c)  # fmt: skip
    assert isinstance(blocked, BlockedEnv) and blocked.units == {("destination", 0)}
    pairs = _lockstep(real, blocked, _random_actions(0, 400))
    hits = 0
    for r, b, positions in pairs:
        inside = blocked_dest in positions  # the state after the step is in B: an agent on destination 0
        hits += inside
        assert b.reward - r.reward == (-c if inside else 0.0)  # exactly -c, else exactly 0
        assert b.info["real_reward"] == r.reward and b.info["blocked"] == inside
        assert np.array_equal(b.observation.obs, r.observation.obs) and b.terminated == r.terminated
    assert 10 < hits < 400 and any(r.reward == 1.0 for r, _, _ in pairs)  # both cases occur, successes too


def test_hard_blocking_never_enters_a_blocked_cell():
    blocked = make_env("blocked:grid:multi_destination", size=3, episode_limit=50, block_mode="hard",
                       blocked_units=[["destination", 0], ["destination", 2]])  # fmt: skip
    blocked.reset()
    banned = {blocked.destinations[0], blocked.destinations[2]}
    visited = set()
    for a in _random_actions(1, 600):
        step = blocked.step(a)
        visited |= set(blocked.positions)
        assert not banned & set(blocked.positions) and step.reward >= 0 and not step.info["blocked"]
        if step.terminated or step.truncated:
            blocked.reset()
    assert {blocked.destinations[1], blocked.destinations[3]} <= visited  # the unblocked ones are reached


def test_the_empty_blocking_set_reproduces_the_real_environment_exactly():
    for mode in ("penalty", "hard"):
        real = MultiDestinationSpread(size=3, episode_limit=6)
        blocked = BlockedEnv(MultiDestinationSpread(size=3, episode_limit=6), [], mode, penalty=5.0)
        for r, b, _ in _lockstep(real, blocked, _random_actions(2, 300)):
            assert (b.reward, b.terminated, b.truncated) == (r.reward, r.terminated, r.truncated)
            assert np.array_equal(b.observation.obs, r.observation.obs)
            assert np.array_equal(b.observation.state, r.observation.state) and not b.info["blocked"]
            assert {k: v for k, v in b.info.items() if k in r.info} == r.info


def test_bad_blocking_is_refused():
    with pytest.raises(ConfigError, match="not units of MultiDestinationSpread"):
        make_env("blocked:grid:multi_destination", blocked_units=[["destination", 7]])
    with pytest.raises(ConfigError, match="block_mode"):
        make_env("blocked:grid:multi_destination", block_mode="wall")
    with pytest.raises(ConfigError, match="has no blockable units"):
        make_env("blocked:grid:door", blocked_units=[])


def test_blocking_sets_start_empty_and_are_distinct_draws_of_the_given_size():
    units = [("destination", k) for k in range(4)]
    sets = sample_blocking_sets(units, count=5, size=3, seed=0)
    assert sets[0] == frozenset() and len(set(sets)) == 5 and all(len(s) == 3 for s in sets[1:])
    assert sets == sample_blocking_sets(units, count=5, size=3, seed=0)  # the seed fixes the draw
    many = [(f"cell{i}",) for i in range(12)]
    assert sample_blocking_sets(many, 4, 2, seed=0) != sample_blocking_sets(many, 4, 2, seed=1)
    assert sample_blocking_sets(units, 3, 0) == [frozenset()] * 3  # no blocking: an FCP-style population
    assert all(sample_blocking_sets(units, 2, 1, include_empty=False))
    with pytest.raises(ConfigError, match="needs 5 distinct blocking sets"):
        sample_blocking_sets(units, count=6, size=3)


def test_overcooked_blocks_cells_and_tiles():
    pytest.importorskip("overcooked")
    N, W, INTERACT = 0, 3, 5
    env = make_env("blocked:overcooked:cramped_room", episode_limit=20, block_penalty=2.0,
                   blocked_units=[["cell", 1, 1], ["onion", 0, 1]])  # fmt: skip
    assert ("pot", 2, 0) in env.env.blockable_units() and ("cell", 2, 1) in env.env.blockable_units()
    env.reset()  # agent 0 at (1, 2) facing north: north enters (1, 1), west turns it to the onion dispenser (0, 1)
    rewards = [env.step([a, 4]).reward for a in (N, W, INTERACT, 2)]  # 2: east, off the blocked cell
    assert rewards == [-2.0, -2.0, -2.0, 0.0]  # on the cell, still on it, on it and using the dispenser (once)
    hard = make_env("blocked:overcooked:cramped_room", episode_limit=20, block_mode="hard",
                    blocked_units=[["cell", 1, 1], ["onion", 0, 1]])  # fmt: skip
    hard.reset()
    hard.step([N, 4])
    assert hard.env.state.players[0].position == (1, 2)  # the move into the blocked cell became a stay
    hard.step([W, 4])
    hard.step([INTERACT, 4])  # facing (0, 2), a counter (not blocked): nothing to pick up there
    assert hard.env.state.players[0].held_object is None


# ---------------------------------------------------------------- frozen partners


def _mac(info, seed, hidden=8):
    torch.manual_seed(seed)
    return MultiAgentController(info, hidden=hidden, last_action=False)


def test_a_frozen_partner_acts_exactly_as_its_policy_and_its_steps_train_nothing():
    envs = [MultiDestinationSpread(size=3, episode_limit=5) for _ in range(3)]
    info = envs[0].info
    ego, partner_mac = _mac(info, 0), _mac(info, 1)
    learner = MappoLearner(ego, LearnerConfig(optimizer="adam"), MappoConfig(ppo_epoch=2, critic_hidden=8))
    runner = EpisodeRunner(envs, ego, seed=0)
    learner.attach(runner)
    partner = PolicyPartner(partner_mac, "p")
    assert not any(p.requires_grad for p in partner_mac.parameters())
    hook = PartnerHook(runner, [partner], partner_agent=1, seed=0)
    batch, _ = runner.run(0.0, test=True)
    filled = batch["filled"] > 0
    logits = partner_mac.unroll(batch["obs"], batch["actions"])[:, :-1, 1]  # (B, T, A) the partner as agent 1
    assert torch.equal(batch["actions"][:, :, 1][filled], greedy(logits, batch["avail"][:, :-1, 1])[filled])
    assert (batch["step_agent_mask"][filled] == torch.tensor([1.0, 0.0])).all()
    # training episodes, partners on either side: an update ignores what the partner did (bit-identical weights)
    hook.partner_agent = "random"
    batch, _ = runner.run(0.0)
    mask = batch["step_agent_mask"]
    assert all(row in ([1.0, 0.0], [0.0, 1.0]) for row in mask[:, 0].tolist())
    other = copy.deepcopy(batch)
    partner_steps = (mask == 0) & (batch["filled"] > 0).unsqueeze(-1)
    other.data["actions"][partner_steps] = (other.data["actions"][partner_steps] + 1) % 5  # all still available
    twin = copy.deepcopy(learner)
    assert learner.train(batch, 3) == twin.train(other, 3)
    for a, b in zip(learner.state_dict().values(), twin.state_dict().values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # and the partner-agent logits get no gradient from the policy loss
    from leantrain.marl.mappo import ppo_losses

    logp = torch.zeros(1, 2, 2, requires_grad=True)
    zeros = torch.zeros(1, 2)
    ego_only = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B, T, N): the ego is agent 0, then agent 1
    loss = ppo_losses(logp, zeros.unsqueeze(-1), torch.ones(1, 2), zeros.unsqueeze(-1), zeros, zeros, zeros,
                      torch.ones(1, 2), MappoConfig(), agent_mask=ego_only)  # fmt: skip
    loss["policy"].backward()
    assert logp.grad[0, 0, 1] == 0 and logp.grad[0, 1, 0] == 0 and logp.grad[0, 0, 0] != 0


def test_scripted_partners_and_partner_specs():
    envs = [MultiDestinationSpread(size=3) for _ in range(2)]
    ego = _mac(envs[0].info, 0)
    result = crossplay(ego, ScriptedPartner("random"), envs, episodes=4, seed=0)
    assert len(result["returns"]) == 4 and set(result["by_partner_agent"]) == {0, 1}
    sampled = crossplay(ego, PolicyPartner(_mac(envs[0].info, 1), "p"), envs, episodes=4, seed=0, sample=True)
    assert len(sampled["returns"]) == 4  # both sides sampling (Overcooked's cross-play)
    assert isinstance(load_partner("scripted:random"), ScriptedPartner)
    with pytest.raises(ConfigError, match="unknown scripted partner"):
        load_partner("scripted:nope")
    with pytest.raises(ConfigError, match="greedy_cook plays Overcooked only"):
        crossplay(ego, ScriptedPartner("greedy_cook"), envs, episodes=2)


# ---------------------------------------------------------------- conventions and cross-play


def _self_play(seed, updates=60):
    torch.manual_seed(seed)
    envs = [MultiDestinationSpread(size=3, episode_limit=6) for _ in range(16)]
    mac = MultiAgentController(envs[0].info, hidden=16, last_action=False)
    learner = MappoLearner(mac, LearnerConfig(optimizer="adam", lr=3e-3),
                           MappoConfig(ppo_epoch=4, critic_hidden=16), seed=seed)  # fmt: skip
    runner = EpisodeRunner(envs, mac, seed=seed)
    learner.attach(runner)
    for _ in range(updates):
        learner.train(runner.run(0.0)[0], 0)
    _, stats = runner.run(0.0, test=True)
    return mac, stats, envs[0].positions[0]


def test_self_play_learns_one_convention_and_cross_play_between_conventions_fails():
    mac0, stats0, end0 = _self_play(0)
    mac1, stats1, end1 = _self_play(1)
    # each pair meets on a destination in the shortest time, greedily, every episode
    assert stats0.returns == [1.0] * 16 and stats1.returns == [1.0] * 16 and set(stats0.lengths) == {2}
    dests = MultiDestinationSpread(size=3).destinations
    assert end0 in dests and end1 in dests and end0 != end1  # two seeds, two conventions
    envs = [MultiDestinationSpread(size=3, episode_limit=6) for _ in range(2)]
    assert crossplay(mac0, PolicyPartner(copy.deepcopy(mac0), "self"), envs, 4)["mean"] == 1.0
    cross = crossplay(mac0, PolicyPartner(copy.deepcopy(mac1), "other"), envs, 4)
    assert cross["mean"] == 0.0 and cross["by_partner_agent"] == {0: 0.0, 1: 0.0}


# ---------------------------------------------------------------- runs: snapshots, the pipeline


def test_policy_snapshots_are_kept_every_n_steps(tmp_path):
    cfg = resolve("mappo-sp-multi-destination", [*TINY, "marl.max_steps=200", "marl.snapshot_every=60",
                                                 f"output_dir={tmp_path}"])  # fmt: skip
    run_dir = run(cfg).run_dir
    snaps = sorted((run_dir / "policies").glob("*.safetensors"))
    steps = [int(p.stem.split("-")[1]) for p in snaps]
    assert steps[0] == 0 and len(steps) == 4 and all(60 * i <= s < 60 * i + 40 for i, s in enumerate(steps))
    assert set(load_file(str(snaps[-1]))) == set(load_file(str(run_dir / "model.safetensors")))


def test_the_sbc_pipeline_runs_end_to_end(tmp_path):
    cfg = resolve("sbc-multi-destination", [*TINY_SBC, f"output_dir={tmp_path}"])
    assert kind_of(cfg).name == "sbc"
    result = run(cfg)
    s, run_dir = result.summary, result.run_dir
    assert s["status"] == "completed" and s["stages_done"] == 6  # 3 partners, 1 held-out, ego, cross-play
    assert s["blocking_sets"][0] == [] and all(len(b) == 3 for b in s["blocking_sets"][1:])
    assert set(s["final"]) == {"crossplay_return", "crossplay_return_std", "sp_crossplay_return",
                               "sp_crossplay_return_std"}  # fmt: skip
    partner = resolve(str(next((run_dir / "partners").glob("partner-01-*")) / "config.yaml"))
    assert partner.marl.env == "blocked:grid:multi_destination" and partner.marl.snapshot_every == 40
    assert partner.marl.env_args["blocked_units"] == s["blocking_sets"][1] and partner.seed == 10_001
    ego = resolve(str(next((run_dir / "ego").glob("ego-*")) / "config.yaml"))
    assert ego.marl.algo == "mappo-br" and ego.marl.method_options["entropy_coef"] == 0.05
    assert len(ego.marl.method_options["partners"]) == 9  # 3 partners x 3 stages (1/3, 2/3, end)
    assert not any(p.endswith("t_env-000000000.safetensors") for p in ego.marl.method_options["partners"])
    crossplay_json = json.loads((run_dir / "crossplay.json").read_text())
    assert set(crossplay_json) == {"sbc", "sp"} and all(len(v) == 1 for v in crossplay_json.values())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records if r["split"] == "job"] == [1, 2, 3, 4, 5, 6]
    # a finished step is reused, never trained again (what a resumed pipeline relies on)
    first = resolve(str(next((run_dir / "partners").glob("partner-00-*")) / "config.yaml"))
    assert run_job(first) == next((run_dir / "partners").glob("partner-00-*"))
    assert len(list((run_dir / "partners").glob("partner-00-*"))) == 1


def test_sbc_configs_are_checked(tmp_path):
    out = f"output_dir={tmp_path}"
    with pytest.raises(ConfigError, match="marl.algo must be mappo"):
        run(resolve("sbc-multi-destination", [*TINY_SBC, out, "marl.algo=qmix"]))
    with pytest.raises(ConfigError, match="partners=\\[\\] must be a non-empty list"):
        run(resolve("mappo-sp-multi-destination", [*TINY, out, "marl.algo=mappo-br"]))


@pytest.mark.slow
def test_the_sbc_ego_coordinates_with_held_out_partners_where_self_play_does_not(tmp_path):
    """The 3 x 3 task, seed 0 (about 30 s): blocked partners (6k steps each), 3 held-out self-play seeds, ego 30k."""
    cfg = resolve("sbc-multi-destination", ["marl.env_args={size: 3, episode_limit: 6}", "sbc.partner_steps=6000",
                                            "marl.max_steps=30000", "sbc.held_out_seeds=3", "marl.n_envs=16",
                                            "marl.batch_episodes=16", "marl.eval_every=10000", "progress=none",
                                            f"output_dir={tmp_path}"])  # fmt: skip
    final = run(cfg).summary["final"]
    assert final["crossplay_return"] >= 0.6 and final["crossplay_return"] > final["sp_crossplay_return"]
