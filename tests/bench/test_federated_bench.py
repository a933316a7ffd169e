"""bench federated: the learning rate of each arm is chosen on validation runs only, its seeds run on test at
that rate; the weak-data partition gives weak clients the classes it says; targets read the right fields."""

import numpy as np
import pytest

from leantrain.bench import federated as bench


def test_each_arm_gets_its_own_rate_chosen_on_validation(monkeypatch):
    calls = []
    # validation accuracy peaks at a different rate per arm; test results must not influence the choice
    best = {"fedavg/iid": 0.1, "fedlama/iid": 0.02}

    def fake(spec):
        calls.append(spec)
        peak = best[spec["key"]]
        val = 0.9 - abs(np.log(spec["lr"] / peak))
        test = 0.5 + 0.01 * spec["seed"] + (0.3 if spec["lr"] == 0.05 else 0.0)  # test would prefer 0.05
        acc = val if spec.get("tune") else test
        return {"final": acc, "last10": acc, "up_bytes": 10, "down_bytes": 20, "up_messages": 1, "wall_s": 1.0,
                "curve": []}  # fmt: skip

    monkeypatch.setattr(bench, "_subprocess", fake)
    arms = [a for a in bench.accuracy_arms(False, "digits") if a["key"] in best]
    rows = bench.tuned_rows(arms, seeds=2, quick=False, part="accuracy", anchor="fedavg")
    by = {r["method"]: r for r in rows}
    assert by["fedavg"]["extra"]["lr"] == 0.1 and by["fedlama"]["extra"]["lr"] == 0.02
    assert all(c.get("tune") and c["seed"] == 0 for c in calls if c["lr"] != by[c["label"]]["extra"]["lr"])
    tests = [c for c in calls if not c.get("tune")]
    assert sorted((c["label"], c["seed"], c["lr"]) for c in tests) == [
        ("fedavg", 0, 0.1), ("fedavg", 1, 0.1), ("fedlama", 0, 0.02), ("fedlama", 1, 0.02)]  # fmt: skip
    assert by["fedavg"]["metric"] == pytest.approx(0.505) and by["fedavg"]["bytes_up"] == 10
    assert set(by["fedavg"]["extra"]["lr_search_val_last10"]) == {str(lr) for lr in bench.LR_GRID}


def test_iid_arms_take_the_rate_chosen_on_their_methods_dirichlet_validation(monkeypatch):
    calls = []

    def fake(spec):
        calls.append(spec)
        acc = 0.9 - abs(np.log(spec["lr"] / 0.1)) if spec.get("tune") else 0.5
        return {"final": acc, "last10": acc, "up_bytes": 1, "down_bytes": 1, "up_messages": 1, "wall_s": 1.0,
                "curve": []}  # fmt: skip

    monkeypatch.setattr(bench, "_subprocess", fake)
    arms = [a for a in bench.accuracy_arms(False, "digits") if a["label"] == "fedavg"]
    rows = bench.tuned_rows(arms, seeds=1, quick=False, part="accuracy", anchor="fedavg")
    assert {c["task"] for c in calls if c.get("tune")} == {"dirichlet"}
    assert [(r["task"], r["extra"]["lr"]) for r in rows] == [("dirichlet", 0.1), ("iid", 0.1)]


def test_weak_data_partition_gives_weak_clients_most_of_their_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=2000)
    names = ["weak", "strong", "moderate", "weak", "strong", "weak", "strong", "moderate"]
    parts = bench.weak_held_partition(labels, names, classes=(0, 1, 2), share=0.9, seed=1)
    together = np.concatenate(parts)
    assert len(together) == len(labels) == len(np.unique(together)) and all(len(p) for p in parts)
    weak = np.concatenate([p for p, n in zip(parts, names, strict=True) if n == "weak"])
    for c in range(10):
        in_weak = np.isin(np.flatnonzero(labels == c), weak).mean()
        assert in_weak == pytest.approx(0.9, abs=0.01) if c < 3 else in_weak == 0


def test_targets_compare_last_ten_round_means():
    def row(method, task, last, up=100, down=100):
        return {"method": method, "task": task, "bytes_up": up, "bytes_down": down, "extra": {"last10_mean": last}}

    rows = {"accuracy": [row("fedavg", "iid", 0.80), row("fedluar", "iid", 0.795, up=25), row("fedlama", "iid", 0.7)],
            "cross-device": [{"method": "simulator", "clients_per_s": 100.0},
                             {"method": "simulator-vmap", "clients_per_s": 600.0},
                             {"method": "flower", "clients_per_s": 5.0}]}  # fmt: skip
    met = bench.targets(rows)
    assert met["fedluar_within_1pt_iid"] and met["fedluar_uplink<=0.3x_fedavg_iid"]
    assert not met["fedlama_within_1pt_iid"]
    assert met["cross_device>=50x_flower"] and met["vmap>=5x_sequential"]


def test_parts_run_separately_merge_into_one_document(tmp_path):
    import json

    def row(method, part, metric):
        return {"method": method, "task": "t", "metric": metric, "extra": {"part": part, "last10_mean": metric}}

    info = {"dataset": "digits", "lr_grid": [0.05], "wall_time_s": 1.0}
    path = bench.merge_into_area(tmp_path / "federated.json", {"partial": [row("fedavg", "partial", 0.5)]}, info)
    bench.merge_into_area(path, {"memory": [row("simulator-10-clients", "memory", None)]}, info)
    bench.merge_into_area(path, {"partial": [row("fedavg", "partial", 0.6), row("fedpa", "partial", 0.7)]}, info)
    doc = json.loads(path.read_text())
    assert sorted((r["method"], r["metric"]) for r in doc["rows"]) == [
        ("fedavg", 0.6), ("fedpa", 0.7), ("simulator-10-clients", None)]  # fmt: skip
    assert doc["complete"] is False and set(doc["runs"]) == {"partial", "memory"}
