"""``leantrain run hetero-*``: the recipes run in one process (virtual clock) and as spawned processes (real clock),
with clear errors for bad settings; under torchrun (slow) the followers train their workers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leantrain.config import load_recipe, resolve
from leantrain.errors import ConfigError
from leantrain.runs.launch import run

TINY = ["data.dataset=digits", "data.batch_size=16", "hetero.period_steps=4", "progress=none", "threads=1"]


def _recipe(name: str) -> dict:
    """The shipped recipe with a small MLP in place of the CNN (digits rows are 64-long vectors)."""
    return {**load_recipe(name), "model": {"name": "mlp", "options": {"hidden_sizes": [32]}}}


@pytest.mark.parametrize("method", ["sync", "local-uniform", "biased"])
def test_the_recipes_run_on_the_virtual_clock(method, tmp_path):
    overrides = [*TINY, "hetero.time_budget_s=0.4", "hetero.eval_every_s=0.2", f"output_dir={tmp_path}"]
    cfg = resolve(_recipe(f"hetero-{method}-fashion-mnist"), overrides)
    result = run(cfg)
    s = result.summary
    assert s["kind"] == "hetero" and s["status"] == "completed" and s["processes"] == 1
    assert s["time_s"] >= 0.4 and 0.0 <= s["final"]["test_accuracy"] <= 1.0
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["time_s"] for r in records]
    assert times[0] == 0.0 and times == sorted(times)
    for due in (0.2, 0.4):  # evaluated at the end of the round that passes each multiple of eval_every_s
        assert any(due - 1e-9 <= t < due + 0.17 for t in times), times
    if method == "biased":
        assert s["local_steps"] == [4, 1] and s["wait_s"] == [0.0, 0.0]
    else:
        assert s["wait_s"][0] > 0 and s["wait_s"][1] == 0.0  # the fast worker waits for the 4x slower one


def test_real_processes_run_and_report_each_worker(tmp_path):
    cfg = resolve(_recipe("hetero-biased-fashion-mnist"), [*TINY, "hetero.clock=real", "hetero.time_budget_s=1.5",
                                                  f"output_dir={tmp_path}"])  # fmt: skip
    s = run(cfg).summary
    assert s["processes"] == 2 and s["status"] == "completed" and s["time_s"] >= 1.5
    assert s["steps"][0] == 4 * s["steps"][1] > 0  # 4 local steps against 1, every round
    per_step = [b / n for b, n in zip(s["busy_s"], s["steps"], strict=True)]
    assert per_step[1] > 2 * per_step[0]  # the slow worker sleeps 3x its compute after each step (4x in all)
    assert len(list(tmp_path.iterdir())) == 1  # the spawned worker opened no run folder


def test_a_time_budgeted_period_gives_each_worker_the_steps_its_speed_allows(tmp_path):
    overrides = [*TINY, "hetero.clock=real", "hetero.time_budget_s=1.5", "hetero.period_s=0.05",
                 f"output_dir={tmp_path}"]  # fmt: skip
    cfg = resolve(_recipe("hetero-biased-fashion-mnist"), overrides)
    s = run(cfg).summary
    assert s["steps"][1] >= s["rounds"]  # at least one step a round
    assert s["steps"][0] > 2 * s["steps"][1]  # the fast worker fits about 4x as many steps into each period
    with pytest.raises(ConfigError, match="needs the real clock"):
        run(resolve(_recipe("hetero-biased-fashion-mnist"), [*TINY, "hetero.period_s=0.05", "hetero.epochs=1",
                                                             f"output_dir={tmp_path}"]))  # fmt: skip


def test_virtual_clock_on_two_processes_gives_the_one_process_run(tmp_path):
    base = [*TINY, "hetero.epochs=1", f"output_dir={tmp_path}"]
    one = run(resolve(_recipe("hetero-biased-fashion-mnist"), base)).summary
    two = run(resolve(_recipe("hetero-biased-fashion-mnist"), [*base, "hetero.processes=2"])).summary
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["final"]["test_accuracy"] == pytest.approx(one["final"]["test_accuracy"], abs=1e-9)
    assert two["time_s"] == one["time_s"] and two["steps"] == one["steps"]


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="hetero.time_budget_s or hetero.epochs"):
        run(
            resolve(
                _recipe("hetero-biased-fashion-mnist"), [*TINY, "hetero.time_budget_s=null", f"output_dir={tmp_path}"]
            )
        )
    with pytest.raises(ConfigError, match="slowdowns"):
        run(resolve(_recipe("hetero-biased-fashion-mnist"), [*TINY, "hetero.slowdowns=[1, 0]",
                                                             f"output_dir={tmp_path}"]))  # fmt: skip
    with pytest.raises(ConfigError, match="one process per worker"):
        run(resolve(_recipe("hetero-biased-fashion-mnist"), [*TINY, "hetero.clock=real", "hetero.processes=1",
                                                    "hetero.time_budget_s=1", f"output_dir={tmp_path}"]))  # fmt: skip
    with pytest.raises(ConfigError, match="has no option"):
        run(
            resolve(
                _recipe("hetero-sync-fashion-mnist"), [*TINY, "hetero.options={beta: 1}", f"output_dir={tmp_path}"]
            )
        )


@pytest.mark.slow
def test_torchrun_runs_the_same_hetero_run(tmp_path):
    base = [*TINY, "hetero.epochs=2", "hetero.processes=2"]
    one = run(resolve(_recipe("hetero-biased-fashion-mnist"), [*base, f"output_dir={tmp_path / 'one'}"])).summary
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(_recipe("hetero-biased-fashion-mnist")))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "leantrain", "run", str(recipe), *base,
           f"output_dir={tmp_path / 'two'}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    (two,) = (tmp_path / "two").iterdir()  # one run folder: rank 0's
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["final"] == one["final"] and summary["steps"] == one["steps"]
