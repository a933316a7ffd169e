"""GPT-FL bench arms: one budget for every arm, the synthetic-only baseline contacts no client, targets."""

from leantrain.bench.federated import bench_algorithm
from leantrain.bench.federated_pretrain import SyntheticOnly, pretrain_arms, rounds_to, targets


def test_arms_share_one_budget_and_labels_start_with_gptfl():
    for quick in (True, False):
        arms = pretrain_arms(quick)
        assert [a["label"] for a in arms] == ["gptfl-scratch", "gptfl-synthetic-only", "gptfl"]
        assert len({(a["rounds"], tuple(sorted(a["settings"].items())), a["dataset"]) for a in arms}) == 1
        assert arms[1]["options"] == arms[2]["options"]  # the same pretraining for both pretrained arms
    assert isinstance(bench_algorithm(pretrain_arms(True)[1]), SyntheticOnly)
    assert SyntheticOnly().sample(0, 10, None, list(range(40))) == []


def _row(method, last10, curve):
    return {"method": method, "extra": {"last10_mean": last10, "curve_seed0": curve}}


def test_targets_read_last10_and_rounds_to_scratch_peak():
    rows = [_row("gptfl-scratch", 0.35, [(1, 0.2), (9, 0.3), (19, 0.36)]),
            _row("gptfl-synthetic-only", 0.6, [(1, 0.6), (19, 0.6)]),
            _row("gptfl", 0.7, [(1, 0.59), (9, 0.65), (19, 0.7)])]  # fmt: skip
    assert targets(rows) == {"gptfl_above_scratch": True, "gptfl_above_synthetic_only": True,
                             "gptfl_fewer_rounds_to_scratch_peak": True}  # fmt: skip
    assert rounds_to([(1, 0.2), (9, 0.3)], 0.3) == 10 and rounds_to([(1, 0.2)], 0.5) is None
    assert targets(rows[:1]) == {}
