"""bench optim --part async: one setting per fresh process; rows, ratios and the worker's statistics."""

import pytest

from leantrain.bench import optim_async
from leantrain.data.sources import FASHION_MNIST_DIR


@pytest.mark.skipif(
    not hasattr(__import__("os"), "sched_setaffinity") or len(__import__("os").sched_getaffinity(0)) < 2,
    reason="needs Linux core pinning and 2 cores",
)
@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST (Debian dataset-fashion-mnist) not installed"
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


def test_async_rows_run_the_anchor_first_and_add_each_row_with_its_ratios(monkeypatch):
    step = {"asyncsam-2proc-s1": 0.3, "sgd-1core": 0.2}
    calls = []

    def run_setting(name, steps, warmup):
        calls.append(name)
        return {"times": [1.0] * warmup + [step[name]] * steps}

    monkeypatch.setattr(optim_async, "_run_setting", run_setting)
    added = []
    rows = optim_async.async_rows(2, steps=4, warmup=2, log=lambda m: None,
                                  settings=("asyncsam-2proc-s1", "sgd-1core"), add=added.append)  # fmt: skip
    assert calls == ["sgd-1core", "asyncsam-2proc-s1"] * 2 and added == rows
    by = {r["method"]: r["extra"] for r in rows}
    assert by["sgd-1core"]["ratio_to_sgd_1core"] == 1.0 and by["sgd-1core"]["epoch_ratio_to_sgd_1core"] == 1.0
    assert by["asyncsam-2proc-s1"]["ratio_to_sgd_1core"] == pytest.approx(1.5)
    sgd_epoch = 2 * (1.0 - 0.2) + optim_async.EPOCH_STEPS * 0.2  # start cost + 469 x median
    async_epoch = 2 * (1.0 - 0.3) + optim_async.EPOCH_STEPS * 0.3
    assert by["asyncsam-2proc-s1"]["epoch_ratio_to_sgd_1core"] == pytest.approx(async_epoch / sgd_epoch)
