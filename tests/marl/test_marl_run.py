"""MARL recipes through `leantrain run`."""

import json

import pytest
from safetensors.torch import load_file

from leantrain.config import resolve
from leantrain.errors import ConfigError
from leantrain.train.run import run


def test_qmix_climbing_recipe_runs_reduced(tmp_path):
    cfg = resolve("qmix-climbing", ["marl.t_max=400", "marl.test_every=200", "marl.log_every_episodes=100",
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
        cfg = resolve(recipe, ["marl.t_max=160", "marl.test_every=80", "marl.switch_episode=80", "progress=none",
                               f"output_dir={tmp_path}"])  # fmt: skip
        s = run(cfg).summary
        assert s["status"] == "completed" and s["algo"] == "s2q" and s["updates"] > 0


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
