"""bench optim --part async: one setting per fresh process; rows, ratios and the worker's statistics."""

import pytest

from leantrain.bench import optim_async


@pytest.mark.skipif(
    not hasattr(__import__("os"), "sched_setaffinity") or len(__import__("os").sched_getaffinity(0)) < 2,
    reason="needs Linux core pinning and 2 cores",
)
def test_async_rows_measure_sgd_and_the_two_process_mode():
    rows = optim_async.async_rows(1, steps=2, warmup=2, log=lambda m: None,
                                  settings=("sgd-1core", "asyncsam-2proc-s2"))  # fmt: skip
    by = {r["method"]: r for r in rows}
    assert by["sgd-1core"]["extra"]["ratio_to_sgd_1core"] == 1.0
    two = by["asyncsam-2proc-s2"]["extra"]
    assert two["misses"] == 0  # on_miss="wait": every step after the first had the previous step's ascent
    assert 8 <= two["ascent_batch_mean"] <= 256
    assert two["epoch_s_projected"] > 0 and two["ratio_to_sgd_1core"] > 0
    assert set(optim_async.targets(rows)) == {"asyncsam-2proc-s2_epoch<=1.15x_sgd_1core"}


def test_unknown_bench_part_is_a_config_error(tmp_path):
    from leantrain.bench.optim import run_bench
    from leantrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown part.*mlbfgs"):
        run_bench(True, tmp_path, parts=("nope",))
