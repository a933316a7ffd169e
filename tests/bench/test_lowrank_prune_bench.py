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
