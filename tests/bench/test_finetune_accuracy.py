"""The learning-rate choice of `bench finetune`: on validation only, then every seed at the chosen rate."""

import json

import leantrain.bench.finetune_accuracy as acc
from leantrain.bench.report import BenchResults


def fake_run(recipe, overrides):
    """Validation peaks at lr 3e-3 for every method; test accuracy peaks elsewhere (1e-2) and must not matter."""
    o = dict(item.split("=", 1) for item in overrides)
    lr, seed = float(o["optim.lr"]), int(o["seed"])
    val = {1e-3: 0.60, 3e-3: 0.70, 1e-2: 0.65}[lr] + 0.01 * seed
    test = {1e-3: 0.60, 3e-3: 0.62, 1e-2: 0.90}[lr] + 0.01 * seed
    return {"trainable_params": 10, "total_params": 1000, "trainable_pct": 1.0, "steps": 5, "train_time_s": 1.0,
            "step_time_s_median": 0.2, "peak_rss_mb": 100.0, "val_accuracy": val, "test_accuracy": test}  # fmt: skip


def test_the_rate_is_chosen_on_validation_and_rows_are_one_per_seed(monkeypatch, tmp_path):
    monkeypatch.setattr(acc, "run_one", fake_run)
    methods = {"lora": acc.Method("lora-minilm-tweets", anchor=True), "paca": acc.Method("paca-minilm-tweets")}
    results = BenchResults("finetune", tmp_path, threads=1, quick=False)
    rows = acc.accuracy_rows(False, workers=0, log=lambda m: None, add=results.add, set_extra=results.set_extra,
                             methods=methods)  # fmt: skip
    assert [(r["method"], r["extra"]["seed"], r["extra"]["lr"]) for r in sorted(rows, key=lambda r: r["method"])] == [
        ("lora", 0, 3e-3), ("lora", 1, 3e-3), ("lora", 2, 3e-3), ("paca", 0, 3e-3), ("paca", 1, 3e-3),
        ("paca", 2, 3e-3),
    ]  # fmt: skip
    assert [r["metric"] for r in rows if r["method"] == "lora"] == [0.62, 0.63, 0.64]
    doc = json.loads((tmp_path / "finetune.json").read_text())
    assert len(doc["rows"]) == 6 and "lr_grid" in doc and all("lr_grid" not in r for r in doc["rows"])
    grid = [(g["method"], g["lr"]) for g in doc["lr_grid"]]
    assert sorted(grid) == sorted((m, lr) for m in methods for lr in acc.PEFT_GRID)
    assert all("test_accuracy" not in g for g in doc["lr_grid"])
    table = acc.summary_table(rows)
    assert table[0]["test_accuracy"] == 0.63 and table[0]["seeds"] == 3


def test_targets_compare_with_full_fine_tuning():
    table = [{"method": "full", "test_accuracy": 0.73, "trainable_pct": 100.0},
             {"method": "lora", "test_accuracy": 0.70, "trainable_pct": 0.33},
             {"method": "gem", "test_accuracy": 0.65, "trainable_pct": 0.1},
             {"method": "gem-gradient", "test_accuracy": 0.66, "trainable_pct": 0.1}]  # fmt: skip
    met = acc.accuracy_targets(table)
    assert met["lora_within_4pt_of_full"] and not met["gem_within_4pt_of_full"] and not met["gem>=gem-gradient"]
