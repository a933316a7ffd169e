"""The shipped federated recipes run end to end through `leantrain run` on a reduced setting, and resume."""

import json
from pathlib import Path

import pytest

from leantrain.config import resolve
from leantrain.runs.launch import run

FASHION = Path("/usr/share/datasets/fashion-mnist")
RECIPES = ["fedavg", "fedlama", "fedluar", "fedpa", "embracingfl", "kd", "prism", "timelyfl", "fedbuff"]
REDUCED = ["data.train_subset=600", "federated.num_clients=10", "federated.clients_per_round=4",
           "federated.eval_every=2", "progress=none", "threads=1"]  # fmt: skip


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the Fashion-MNIST package")
@pytest.mark.parametrize("name", RECIPES)
def test_federated_recipe_runs_reduced(name, tmp_path):
    rounds = "federated.rounds=8" if name == "fedpa" else "federated.rounds=3"
    steps = [] if name == "fedpa" else ["federated.local_steps=2"]
    result = run(resolve(f"{name}-fashion-mnist", [*REDUCED, rounds, *steps, f"output_dir={tmp_path}"]))
    summary = result.summary
    assert summary["status"] == "completed" and summary["algorithm"] == name
    assert 0 < summary["final"]["test_accuracy"] <= 1
    assert summary["totals"]["up_bytes"] > 0 and summary["totals"]["down_bytes"] > 0
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == (8 if name == "fedpa" else 3)
    assert json.loads(lines[-1])["round"] == len(lines) - 1


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the Fashion-MNIST package")
def test_federated_run_resumes_to_the_same_result(tmp_path):
    base = [*REDUCED, "federated.local_steps=2", f"output_dir={tmp_path}", "federated.client_dropout=0.2"]
    straight = run(resolve("fedluar-fashion-mnist", [*base, "federated.rounds=4"])).summary
    first = run(resolve("fedluar-fashion-mnist", [*base, "federated.rounds=4", "federated.stop_after=2"]))
    assert first.summary["status"] == "stopped" and first.summary["rounds_done"] == 2
    resumed = run(resolve("fedluar-fashion-mnist", [*base, "federated.rounds=4", f"resume={first.run_dir}"]))
    assert resumed.summary["status"] == "completed" and resumed.summary["resumed_from_round"] == 2
    assert resumed.summary["final"] == straight["final"] and resumed.summary["totals"] == straight["totals"]
    assert len((first.run_dir / "metrics.jsonl").read_text().splitlines()) == 4
