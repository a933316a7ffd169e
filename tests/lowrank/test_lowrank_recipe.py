"""The lowrank: config section through `leantrain run`: DRA on a digits MLP, resume across a switch, bad input."""

import json

import pytest
from safetensors.torch import load_file

from leantrain.config import resolve
from leantrain.errors import ConfigError
from leantrain.runs.launch import run
from leantrain.train.checkpoint import list_checkpoints

BASE = {
    "name": "dra-digits", "threads": 1, "progress": "none",
    "data": {"dataset": "digits", "batch_size": 64},
    "model": {"name": "mlp", "hidden_sizes": [32, 32]},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "train": {"epochs": 5, "schedule": "step", "decay_epochs": [3]},
    "lowrank": {"training": "dynamic", "rank_ratio": 0.25, "switch_epochs": [2, 4], "target_layers": ["net.*"]},
}  # fmt: skip


def _cfg(tmp_path, *overrides):
    return resolve(BASE, [f"output_dir={tmp_path}", *overrides])


def _weights(run_dir):
    return load_file(str(list_checkpoints(run_dir / "checkpoints")[-1] / "model.safetensors"))


def test_dynamic_run_logs_phases_and_ranks_and_resumes_across_a_switch(tmp_path):
    straight = run(_cfg(tmp_path / "a"))
    info = straight.summary["lowrank"]
    assert info["events"] == [[0, "lowrank"], [2, "full"], [4, "adapter"]]
    records = [json.loads(line) for line in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    phases = [(r["epoch"], r["phase"]) for r in records if r["split"] == "phase"]
    assert phases == [(2, "full"), (4, "adapter")]
    ranks = [r for r in records if r["split"] == "rank"]
    assert [r["epoch"] for r in ranks] == [0, 1, 2, 3, 4, 5]
    assert all(r["erank_mean"] > 0 for r in ranks)
    assert straight.summary["final"]["test_accuracy"] > 0.5

    first = run(_cfg(tmp_path / "b", "train.epochs=3"))  # stops inside the full-rank phase
    resumed = run(_cfg(tmp_path / "b", "train.epochs=5", f"resume={first.run_dir}"))
    a, b = _weights(straight.run_dir), _weights(resumed.run_dir)
    assert a.keys() == b.keys() and any(".base." in k for k in a)  # ends in the adapter phase
    assert all((a[k] == b[k]).all() for k in a)


def test_fixed_and_full_training(tmp_path):
    fixed = run(_cfg(tmp_path, "lowrank.training=fixed")).summary
    full = run(_cfg(tmp_path, "lowrank.training=full")).summary
    assert fixed["lowrank"]["target_layers"] == full["lowrank"]["target_layers"]
    assert fixed["trainable_params"] < full["trainable_params"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("lowrank.rank_ratio=0", "lowrank.rank_ratio"),
        ("lowrank.rank_ratio=1.5", "lowrank.rank_ratio"),
        ("lowrank.switch_epochs=[3,2]", "switch_epochs"),
        ("lowrank.switch_epochs=[2]", "switch_epochs"),
        ("prune.var_lam=1e-4", "not supported"),
        ("lowrank.training=sometimes", "lowrank.training"),
    ],
)
def test_bad_config_is_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, override)


def test_target_patterns_that_match_nothing_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no layer"):
        run(_cfg(tmp_path, "lowrank.target_layers=[nothing.*]"))
