"""The mL-BFGS benchmark on tiny settings: row structure, real ill-conditioning, the divergence detector."""

import math
import statistics
from pathlib import Path

import pytest
import torch

from leantrain.bench import optim_quasi_newton as qn
from leantrain.data.sources import FASHION_MNIST_DIR


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return qn.ill_conditioned_digits()


def quiet(msg: str) -> None:
    pass


def test_ill_conditioning_is_real(data):
    plain = qn.ill_conditioned_digits(scale=False)
    assert torch.equal(plain["y_train"], data["y_train"])
    scaled, unscaled = qn.input_condition_number(data["x_train"]), qn.input_condition_number(plain["x_train"])
    assert scaled > 1e4 * unscaled
    s = data["scales"]
    assert s.min() >= 1e-2 and s.max() <= 1e2 and s.max() / s.min() > 1e3  # spans most of 10**[-2, 2]
    assert torch.equal(s, qn.ill_conditioned_digits()["scales"])  # a fixed generator


def test_divergence_detector_flags_a_huge_lr(data):
    for lr in (1e6, 100.0):  # a non-finite minibatch loss, and a finite full loss > 10x the initial one
        r = qn.run_curve("sgd", data, seed=0, lr=lr, iterations=40, eval_every=10)
        assert r["diverged"] and r["final_loss"] is None and r["diverged_at"] <= 40
        assert r["spikes"] >= 1 and len(r["curve"]) == 5 and r["curve"][-1] is None
    sane = qn.run_curve("sgd", data, seed=0, lr=1e-3, iterations=40, eval_every=10)
    assert not sane["diverged"] and sane["final_loss"] < sane["curve"][0] and None not in sane["curve"]


def test_spikes_and_iterations_to_threshold():
    assert qn.count_spikes([3.0, 1.0, 2.5, 0.9, 0.5, 1.2, 1.3, 0.4]) == 2  # 2.5 > 2*1.0; 1.2 > 2*0.5 (one edge)
    assert qn.count_spikes([3.0, 1.0, math.inf, None, None]) == 1
    assert qn.iterations_to([3.0, 1.0, 0.5, 0.4], threshold=0.5, eval_every=20) == 40
    assert qn.iterations_to([3.0, 1.0, None], threshold=0.5, eval_every=20) == math.inf


def test_curve_rows_structure_targets_and_plot(tmp_path: Path):
    rows = qn.curve_rows(seeds=2, quick=True, log=quiet, iterations=40)
    assert [r["method"] for r in rows] == list(qn.METHODS)
    for r in rows:
        ex = r["extra"]
        assert all(c in r for c in qn.CURVE_COLUMNS)
        assert r["seeds"] == 2 and len(ex["curves"]) == 2 and all(len(c) == 3 for c in ex["curves"])  # it 0, 20, 40
        assert ex["input_cond"] > 1e6 and ex["iterations"] == 40 and ex["eval_every"] == 20
    lrs = {r["method"]: r["lr"] for r in rows}
    assert lrs["adam"] == qn.ADAM_LR and {lrs[m] for m in qn.METHODS if m != "adam"} == {lrs["sgd"]}
    scaling = {r["method"]: r["extra"]["direction_scaling"] for r in rows}
    assert scaling == {"sgd": None, "adam": None, "plain-lbfgs": "global_norm", "mlbfgs": "global_norm",
                       "plain-lbfgs-none": "none", "mlbfgs-none": "none"}  # fmt: skip
    sgd = rows[0]["extra"]
    assert sgd["threshold"] == pytest.approx(statistics.median(sgd["per_seed_final_loss"]))  # SGD's median final
    met = qn.targets(rows, [])
    assert set(met) == {
        "mlbfgs_stable_where_plain_lbfgs_is_not",
        "mlbfgs_reaches_threshold_in_fewer_iterations_than_sgd",
    }
    png = qn.plot_curves(rows, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 100_000


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST (Debian dataset-fashion-mnist) not installed"
)
def test_steptime_rows_time_steps_with_curvature_pairs():
    rows = qn.steptime_rows(repeats=1, steps=2, log=quiet, update_freq=1)
    by = {r["method"]: r for r in rows}
    assert list(by) == list(qn.STEP_METHODS) and by["sgd"]["ratio_to_sgd"] == 1.0
    for name in ("plain-lbfgs", "mlbfgs"):
        ex = by[name]["extra"]
        assert ex["pairs_when_timing_started"] >= 1 and ex["curvature_update_steps_timed"] == 2
        assert ex["warmup_steps"] == 4 and ex["steps_timed"] == 2 and by[name]["step_time_s_median"] > 0
    met = qn.targets([], rows)
    assert set(met) == {"mlbfgs_step<=1.3x_sgd"}


def test_plain_lbfgs_differs_from_mlbfgs_only_in_the_curvature_smoothing():
    w = [torch.zeros(3, requires_grad=True)]
    for suffix, scaling in (("", "global_norm"), ("-none", "none")):
        plain, mlbfgs = (qn.make_optimizer(name + suffix, w, 0.01) for name in ("plain-lbfgs", "mlbfgs"))
        smoothing = {"beta_param", "beta_grad", "beta_pair"}
        diff = {k for k in plain.defaults if plain.defaults[k] != mlbfgs.defaults[k]}
        assert diff == smoothing and all(plain.defaults[k] == 0 for k in smoothing)
        assert plain.direction_scaling == mlbfgs.direction_scaling == scaling
        assert mlbfgs.defaults["beta_param"] == qn.BETA and mlbfgs.defaults["lr"] == 0.01
