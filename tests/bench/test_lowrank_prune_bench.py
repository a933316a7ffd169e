"""The low-rank and pruning benchmarks' bookkeeping: phases, analytic FLOPs, targets (no training here)."""

import pytest

from leantrain.bench import lowrank, prune
from leantrain.config import resolve
from leantrain.errors import ConfigError


def test_phases_and_flops_of_the_standard_setting():
    cfg = resolve(lowrank.RECIPE, lowrank.STANDARD)
    assert lowrank._phases(cfg) == ["lowrank"] * 4 + ["full"] * 6 + ["adapter"] * 2
    macs = lowrank.phase_macs(cfg, (1, 28, 28))
    full = lowrank.phase_macs(resolve(lowrank.RECIPE, [*lowrank.STANDARD, "lowrank.training=full"]), (1, 28, 28))
    assert set(macs) == {"lowrank", "full", "adapter"} and macs["full"] == full["full"]
    # low-rank block convs cost 5/9 of dense ones; the stem conv and the head stay dense
    assert 0.5 < macs["lowrank"] / macs["full"] < 5 / 9 + 0.01
    assert macs["adapter"] > macs["full"]  # frozen dense conv + adapter branch
    svd = resolve(lowrank.RECIPE, [*lowrank.STANDARD, "lowrank.deflate=svd"])
    assert lowrank._phases(svd)[-2:] == ["lowrank", "lowrank"]


def test_lowrank_targets():
    def row(method, acc, ratio):
        return {"method": method, "metric": acc, "extra": {"flops_ratio_to_full": ratio}}

    met = lowrank.targets([row("full", 0.90, 1.0), row("lowrank", 0.88, 0.56), row("dra", 0.895, 0.65)])
    assert met == {"dra_within_1pt_of_full": True, "dra_flops<=0.7x_full": True, "dra_above_fixed_lowrank": True}
    met = lowrank.targets([row("full", 0.90, 1.0), row("lowrank", 0.88, 0.56), row("dra", 0.87, 0.88)])
    assert not any(met.values())


def test_prune_targets_compare_var_with_plain_at_90_percent():
    def row(method, dense, at90):
        return {"method": method, "metric": dense, "extra": {"pruned": {"0.9": {"mean": at90}}}}

    met = prune.targets([row("mlp-plain", 0.97, 0.80), row("mlp-var", 0.965, 0.86)])
    assert met == {"mlp_var_at_90%>=plain+5pts": True, "mlp_var_dense_within_1pt": True}
    met = prune.targets([row("mlp-plain", 0.97, 0.80), row("mlp-var", 0.95, 0.84)])
    assert met == {"mlp_var_at_90%>=plain+5pts": False, "mlp_var_dense_within_1pt": False}


def test_unknown_parts_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown part"):
        lowrank.run_bench(True, tmp_path, parts=("speed",))
    with pytest.raises(ConfigError, match="unknown part"):
        prune.run_bench(True, tmp_path, parts=("cnn",))


def test_lowrank_rows_are_added_with_their_last_seed_and_ratios_to_full(monkeypatch):
    flops = {"full": 100.0, "lowrank": 60.0, "dra": 65.0, "dra-svd": 65.0}

    def run_arm(arm, seed, quick, tmp):
        return {"accuracy": 0.9 - 0.01 * seed, "train_time_s": flops[arm] / 10, "phases": ["full"],
                "phase_macs": {"full": 1}, "train_flops": flops[arm], "phase_step_s": {"full": 0.1},
                "erank": [3.0, 2.0], "trainable_params": 7}  # fmt: skip

    monkeypatch.setattr(lowrank, "run_arm", run_arm)
    added = []
    rows = lowrank.arm_rows(("full", "lowrank", "dra"), 2, True, lambda m: None, add=added.append)
    assert added == rows and [r["method"] for r in rows] == ["full", "lowrank", "dra"]
    ratios = {r["method"]: (r["extra"]["flops_ratio_to_full"], r["extra"]["time_ratio_to_full"]) for r in rows}
    assert ratios == {"full": (1.0, 1.0), "lowrank": (0.6, 0.6), "dra": (0.65, 0.65)}
    assert rows[0]["metric"] == pytest.approx(0.895) and rows[0]["seeds"] == 2
    svd = lowrank.arm_rows(("dra-svd",), 1, True, lambda m: None)  # no full-rank arm: no ratios
    assert "flops_ratio_to_full" not in svd[0]["extra"]
