"""MARL recipes through `leantrain run`."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run_cli
from leantrain.config import resolve
from leantrain.errors import ConfigError
from leantrain.runs.launch import run


def test_qmix_climbing_recipe_runs_reduced(tmp_path):
    cfg = resolve("qmix-climbing", ["marl.max_steps=400", "marl.eval_every=200", "marl.log_every_episodes=100",
                                    "progress=none", f"output_dir={tmp_path}"])  # fmt: skip
    result = run(cfg)
    s = result.summary
    assert s["status"] == "completed" and s["t_env"] >= 400 and s["updates"] > 0
    assert s["final"]["test_return"] in {11.0, -30.0, 0.0, 7.0, 6.0, 5.0}  # a greedy joint action's payoff
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "test"}
    weights = load_file(str(result.run_dir / "model.safetensors"))
    assert any(k.startswith("mixer.") for k in weights) and any(k.startswith("mac.") for k in weights)


def test_bad_marl_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown matrix game 'prisoners'"):
        run(resolve("qmix-climbing", ["marl.env=matrix:prisoners", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="unknown environment 'gridworld'"):
        resolve("qmix-climbing", ["marl.env=gridworld"])
    with pytest.raises(ConfigError, match="marl.mixer"):
        resolve("qmix-climbing", ["marl.mixer=qplex"])


def test_s2q_recipes_run_reduced(tmp_path):
    for recipe in ("s2q-climbing", "s2q-shifting"):
        cfg = resolve(recipe, ["marl.max_steps=160", "marl.eval_every=80", "marl.switch_episode=80", "progress=none",
                               f"output_dir={tmp_path}"])  # fmt: skip
        result = run(cfg)
        s = result.summary
        assert s["status"] == "completed" and s["algo"] == "s2q" and s["updates"] > 0
    # the saved S2Q policy restores every sub-value (not only Q1)
    from leantrain.marl.robustness import load_run

    _, envs, _, learner = load_run(result.run_dir)
    saved = load_file(str(result.run_dir / "model.safetensors"))
    for name, value in learner.subs[2].state_dict().items():
        assert torch.equal(value, saved[f"sub3_mac.{name}"])
    first = envs[0].reset(seed=0)
    joints = learner.sub_value_greedy(torch.as_tensor(first.obs), torch.as_tensor(first.avail))
    assert len(joints) == 3 and all(len(j) == 2 and all(0 <= a < 3 for a in j) for j in joints)


def test_bench_marl_recovery_and_targets():
    from leantrain.bench import marl

    tests = [{"episodes": e, "return_mean": r} for e, r in ((9000, 11.0), (10500, 5.0), (11000, 11.0), (11500, 11.0))]
    assert marl._recovery(tests, 10_000) == 1000
    assert marl._recovery(tests[:2], 10_000) is None
    rows = [
        {"method": "s2q-climbing", "metric": 0.8, "seeds": 5},
        {"method": "qmix-climbing", "metric": 0.2, "seeds": 5},
    ]
    assert marl.targets(rows) == {"s2q_climbing_optimum>=4/5": True, "qmix_climbing_optimum<=1/5": True}


LBF_SMALL = ["marl.max_steps=600", "marl.eval_every=300", "marl.test_episodes=2", "marl.batch_episodes=4",
             "marl.log_every_episodes=4", "progress=none"]  # fmt: skip


def test_wall_recipe_trains_clean_then_under_attack_and_tests_both(tmp_path):
    pytest.importorskip("lbforaging")
    options = "marl.method_options={clean_steps: 300, budget: 12, test_budget: 8, followups: 1}"
    result = run(resolve("wall-lbf-8x8", [*LBF_SMALL, options, f"output_dir={tmp_path}"]))
    s = result.summary
    assert s["algo"] == "wall" and s["updates"] > 0
    assert 0.0 <= s["final"]["attacked_test_return"] <= 1.0
    tests = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"test"' in x]
    assert all("attacked_return_mean" in r for r in tests)
    weights = load_file(str(result.run_dir / "model.safetensors"))
    assert any(k.startswith("planner.world.") for k in weights)


def test_pretrained_policy_starts_training_from_a_saved_run(tmp_path, capsys):
    pytest.importorskip("lbforaging")
    from leantrain.marl.robustness import ATTACKS, evaluate_attacks
    from leantrain.marl.run import build

    first = run(resolve("qmix-lbf-8x8", [*LBF_SMALL, f"output_dir={tmp_path}"]))
    saved = load_file(str(first.run_dir / "model.safetensors"))
    cfg = resolve("wall-lbf-8x8", [*LBF_SMALL, f"marl.pretrained_policy={first.run_dir}", f"output_dir={tmp_path}",
                                   "marl.method_options={clean_steps: 0, followups: 1}"])  # fmt: skip
    *_, learner, _ = build(cfg)
    for name, value in learner.mac.state_dict().items():
        assert torch.equal(value, saved[f"mac.{name}"])
    for name, value in learner.target_mixer.state_dict().items():
        assert torch.equal(value, saved[f"mixer.{name}"])
    result = evaluate_attacks(first.run_dir, episodes=3, fit_episodes=6, fit_updates=2)
    assert set(result) == set(ATTACKS)  # every registered attack (clean, wolfpack, random, ibal, ...) on LBF 8x8
    assert all(0.0 <= v <= 1.0 for v in result.values())
    # a run started from another run's policy is still attackable once that starting run is deleted (it was not)
    tuned = run(resolve("qmix-lbf-8x8", [*LBF_SMALL, f"marl.pretrained_policy={first.run_dir}",
                                         f"output_dir={tmp_path / 'tuned'}"]))  # fmt: skip
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(first.run_dir, moved)
    shutil.rmtree(first.run_dir)
    assert set(evaluate_attacks(tuned.run_dir, episodes=2, fit_episodes=4, fit_updates=1)) >= {"clean", "wolfpack"}
    shutil.copytree(moved, first.run_dir)
    code, out, err = run_cli(capsys, "attack", str(first.run_dir), "--episodes", "2", "--fit-episodes", "4",
                             "--fit-updates", "1", "--budget", "4")  # fmt: skip
    assert code == 0 and "wolfpack" in out and "random_step" in out and "fitting a Wolfpack planner" in err
    code, _, err = run_cli(capsys, "attack", str(tmp_path / "nowhere"))
    assert code == 2 and "not a finished MARL run folder" in err
    with pytest.raises(ConfigError, match="no model.safetensors"):
        build(resolve("qmix-lbf-8x8", [f"marl.pretrained_policy={tmp_path / 'nowhere'}"]))
    with pytest.raises(ConfigError, match="does not fit"):
        build(resolve("qmix-climbing", [f"marl.pretrained_policy={first.run_dir}"]))
    with pytest.raises(ConfigError, match="method_options for wall"):
        build(resolve("wall-lbf-8x8", ["marl.method_options={bugdet: 3}"]))
    with pytest.raises(ConfigError, match="differs from the saved run in marl.lr"):
        run(resolve("qmix-lbf-8x8", [*LBF_SMALL, f"resume={first.run_dir}", "marl.lr=0.1"]))


def test_bench_marl_lbf_and_attack_targets():
    from leantrain.bench import marl

    def row(method, metric=None, task="pp", **conditions):
        stats = {c: (v, 0.0) for c, v in conditions.items()}
        return {"method": method, "metric": metric, "task": task, "extra": {"mean_std": stats}}

    assert marl.lbf_targets([row("qmix-lbf", 0.5), row("s2q-lbf", 0.46)]) == {"s2q_lbf_clean>=qmix-0.05": True}
    rows = [row("qmix-pp", 0.5),
            row("vanilla-pp-attacked", clean=0.5, wolfpack=0.2, random_step=0.3, random=0.1),
            row("wall-pp-attacked", clean=0.44, wolfpack=0.3, random_step=0.35, random=0.3)]  # fmt: skip
    assert marl.attack_targets(rows) == {
        "pp:wolfpack_drop>random_step_drop": True, "pp:wolfpack_drop>random_drop": False,
        "pp:wall_attacked>vanilla_attacked": True, "pp:wall_clean_loss<=10%": False,
    }  # fmt: skip


def test_bench_marl_parts_pick_one_task_or_method_and_refuse_unknown_ones(tmp_path, monkeypatch):
    from leantrain.bench import marl, marl_methods

    with pytest.raises(ConfigError, match=r"unknown part.*exploration:foxy"):
        marl.run_bench(True, tmp_path, parts=("exploration:foxy",))
    with pytest.raises(ConfigError, match=r"unknown part.*attack:mars"):
        marl.run_bench(True, tmp_path, parts=("attack:mars", "lbf"))
    asked = {}

    def rows(seeds, quick, add=None, methods=()):
        asked["methods"] = methods
        return []

    monkeypatch.setattr(marl_methods, "exploration_rows", rows)
    marl.run_bench(True, tmp_path, parts=("exploration:fim",))
    assert asked["methods"] == ("fim",)
    marl.run_bench(True, tmp_path, parts=("exploration",))
    assert asked["methods"] == tuple(marl_methods.EXPLORATION)


def test_bench_marl_first_optimum_reads_the_sub_values_series():
    from leantrain.bench.marl import _first_optimum

    def test(episodes, *joints):
        return {"episodes": episodes, "sub_value_greedy": [list(j) for j in joints]}

    tests = [
        test(0, (0, 0), (1, 1), (2, 2)),
        test(1000, (1, 1), (0, 0), (2, 2)),
        test(2000, (0, 0), (1, 1), (1, 2)),
        test(3000, (1, 1), (0, 0), (1, 2)),
        test(4000, (0, 0), (1, 1), (1, 2)),
        test(5000, (0, 0), (1, 2), (2, 2)),
    ]
    # the untrained test at 0 never counts; Q1 holds (0, 0) for good from 4000; a sub-value first held it at 1000
    assert _first_optimum(tests) == {"q1": 4000, "sub": 1000}
    assert _first_optimum(tests[:2]) == {"q1": None, "sub": 1000}


def test_bench_marl_throughput_measures_every_learner():
    pytest.importorskip("lbforaging")
    from leantrain.bench import marl

    rows = marl.throughput_rows(quick=True)
    assert [r["method"] for r in rows] == ["qmix", "vdn", "s2q", "wall"]
    for r in rows:
        assert r["metric"] > 0 and r["extra"]["updates_per_s"] > 0 and r["extra"]["batch_episodes"] >= 4
    rows = marl.collection_rows(quick=True)
    assert [r["method"] for r in rows] == [*marl.COLLECTORS, "learner unroll (fused GRU)"]
    assert all(r["metric"] > 0 for r in rows) and rows[0]["extra"]["speedup"] == 1.0


def test_the_pymarl_style_reference_loop_does_the_same_work_as_the_runner():
    """Greedy, on the same environment seed and network, the reference loop takes the runner's actions."""
    pytest.importorskip("lbforaging")
    from leantrain.bench.marl_reference import pymarl_style_episode
    from leantrain.marl import EpisodeRunner, MultiAgentController, make_env

    env = make_env("lbf:Foraging-8x8-2p-2f-coop-v3")
    torch.manual_seed(0)
    mac = MultiAgentController(env.info)
    _, stats = EpisodeRunner([env], mac, seed=0).run(0.0, test=True)
    taken = []
    step = env.step
    env.step = lambda actions: taken.append(list(actions)) or step(actions)
    assert pymarl_style_episode(env, mac, 0.0, seed=0) == stats.lengths[0]
    env.step = step
    batch, _ = EpisodeRunner([env], mac, seed=0).run(0.0, test=True)
    assert taken == batch["actions"][0, : stats.lengths[0]].tolist()


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [("wall-lbf-8x8", ["marl.method_options={clean_steps: 500, followups: 1}"]),  # attack switches on mid-run
     ("s2q-shifting", ["marl.switch_episode=500", "marl.n_envs=4"])],  # the game shifts after the resume point
)  # fmt: skip
def test_resumed_marl_run_equals_the_uninterrupted_run(tmp_path, recipe, extra):
    if recipe.startswith("wall"):
        pytest.importorskip("lbforaging")
    base = ["marl.eval_every=300", "marl.test_episodes=2", "marl.batch_episodes=4", "marl.log_every_episodes=4",
            "progress=none", f"output_dir={tmp_path}", *extra]  # fmt: skip
    whole = run(resolve(recipe, [*base, "marl.max_steps=1200"]))
    cut = run(resolve(recipe, [*base, "marl.max_steps=700"]))  # stops; its last checkpoint is at the test at t = 600
    resumed = run(resolve(recipe, [*base, "marl.max_steps=1200", f"resume={cut.run_dir}"]))
    a, b = load_file(str(whole.run_dir / "model.safetensors")), load_file(str(resumed.run_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(x) for x in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in again if r["split"] != "resume"] == records
    for key in ("t_env", "episodes", "updates"):
        assert resumed.summary[key] == whole.summary[key]
