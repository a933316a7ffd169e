"""Biased local SGD and its baselines: the schedule, the sampling, exact equivalences, and real processes (gloo)."""

import copy
import math
import os

import numpy as np
import pytest
import torch
from hetero_fixtures import (
    dies_after_one_round,
    flat_params,
    follower_rounds,
    stops_answering,
    tiny_model,
    tiny_rows,
    train_rounds,
    trainer,
)

from leantrain.errors import ConfigError, LeantrainError
from leantrain.hetero import (
    LossScores,
    aggregation_weights,
    block_rows,
    make_method,
    proportional_steps,
    slow_workers,
    weighted_average,
)
from leantrain.process_group import launch, spawned_pids

# ---------------------------------------------------------------------------- schedule and weights


def test_steps_are_proportional_to_speed_and_weights_follow_beta():
    assert proportional_steps([1, 4], 32) == [32, 8]
    assert proportional_steps([2, 8], 32) == [32, 8]  # relative to the fastest worker
    assert proportional_steps([1, 1, 3], 32) == [32, 32, 10]
    assert proportional_steps([1, 64], 32) == [32, 1]  # at least one step (the code's CPU_interval = 1)
    assert aggregation_weights([32, 8], 0) == [0.5, 0.5]  # the official code: equal weights
    assert aggregation_weights([32, 8], 1) == [0.8, 0.2]  # by steps
    assert slow_workers([32, 8, 32]) == [1] and slow_workers([4, 4]) == []


@pytest.mark.parametrize("bad", [[], [0.5], [1, float("nan")], "1,4", [True]])
def test_bad_slowdowns_are_refused(bad):
    with pytest.raises(ConfigError, match="slowdowns"):
        proportional_steps(bad, 32)


def test_method_options_are_checked():
    assert make_method("biased", beta=1).beta == 1
    with pytest.raises(ConfigError, match="has no option 'beta'"):
        make_method("local-uniform", beta=1)
    with pytest.raises(ConfigError, match="unknown hetero method"):
        make_method("fedavg")


# ---------------------------------------------------------------------------- sampling


def test_blocks_split_one_pass_in_proportion_to_steps():
    rows, rounds = block_rows(1000, 8, [4, 1], np.random.default_rng(0))
    assert rounds == 1000 // (8 * 5)
    assert [len(r) for r in rows] == [rounds * 4 * 8, rounds * 1 * 8]
    both = np.concatenate(rows)
    assert len(np.unique(both)) == len(both)  # disjoint


def test_slow_workers_get_the_highest_loss_rows_of_the_pool():
    scores = LossScores(1000)
    scores.record(torch.arange(1000), torch.arange(1000, dtype=torch.float32))  # loss = row index
    rng = np.random.default_rng(3)
    rows, rounds = block_rows(1000, 8, [4, 1], rng, scores, slow=[1], pool_ratio=4.0)
    need = rounds * 8
    pool = np.random.default_rng(3)
    pool.permutation(1000)
    candidates = pool.choice(1000, size=4 * need, replace=False)
    assert sorted(rows[1]) == sorted(np.sort(candidates)[-need:])  # the pool's top-k by loss
    assert len(rows[0]) == rounds * 4 * 8  # the fast worker: a fresh random slice of all rows


def test_unseen_rows_count_as_highest_loss():
    scores = LossScores(10)
    scores.record(torch.arange(8), torch.zeros(8))
    assert set(scores.highest(np.arange(10), 2)) == {8, 9}


def test_data_smaller_than_one_round_is_a_clear_error():
    with pytest.raises(ConfigError, match="one round needs 400 training rows"):
        block_rows(100, 8, [32, 18], np.random.default_rng(0))


# ---------------------------------------------------------------------------- the average


def test_weighted_average_is_computed_by_hand():
    a, b = tiny_model(), tiny_model()
    expect = [0.8 * pa.detach() + 0.2 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters(), strict=True)]
    extra, waited = weighted_average([a, b], [4.0, 1.0], extra=[7, 2])  # raw weights: divided by their sum
    assert extra == [7.0, 2.0] and waited == 0.0
    for model in (a, b):
        for p, e in zip(model.parameters(), expect, strict=True):
            torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- exact equivalences


def _sequential_sgd(rounds: int, steps: int, seed: int = 0) -> torch.Tensor:
    """Plain SGD over the rows of each block in order, written out without the trainer."""
    x, y = tiny_rows()
    torch.manual_seed(seed)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    per_block = len(y) // (8 * steps)
    order: list[int] = []
    for block in range(math.ceil(rounds / per_block)):
        order += list(np.random.default_rng([seed, block]).permutation(len(y))[: per_block * steps * 8])
    for i in range(rounds * steps):
        rows = torch.as_tensor(order[i * 8 : (i + 1) * 8])
        loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return flat_params(model)


@pytest.mark.parametrize("method", ["sync", "local-uniform", "biased"])
def test_one_worker_is_sequential_sgd(method):
    rounds = 30  # crosses block boundaries (384 // 32 = 12 local rounds per block)
    got, t = train_rounds(method, [1], rounds)
    steps = 4
    expected = _sequential_sgd(rounds * 4, 1) if method == "sync" else _sequential_sgd(rounds, steps)
    assert torch.equal(got, expected)
    assert t.clock.steps == [rounds * 4]


def test_equal_speeds_with_equal_weights_are_plain_local_sgd():
    uniform, _ = train_rounds("local-uniform", [1, 1], 20)
    biased, t = train_rounds("biased", [1, 1], 20)  # no slow worker: no biased sampling, equal steps and weights
    assert t.steps == [4, 4] and t.scores is None
    assert torch.equal(uniform, biased)


def test_local_sgd_matches_a_hand_written_two_worker_reference():
    x, y = tiny_rows()
    got, _ = train_rounds("local-uniform", [1, 3], 15)
    torch.manual_seed(0)
    base = tiny_model()
    models = [base, copy.deepcopy(base)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for m in models]
    per_block = len(y) // (8 * 8)
    for r in range(15):
        block, k = divmod(r, per_block)
        perm = np.random.default_rng([0, block]).permutation(len(y))
        for j, (m, o) in enumerate(zip(models, opts, strict=True)):
            chunk = perm[j * per_block * 32 : (j + 1) * per_block * 32]
            for s in range(4):
                rows = torch.as_tensor(chunk[(k * 4 + s) * 8 : (k * 4 + s + 1) * 8])
                loss = torch.nn.functional.cross_entropy(m(x[rows]), y[rows])
                o.zero_grad(set_to_none=True)
                loss.backward()
                o.step()
        with torch.no_grad():
            for pa, pb in zip(models[0].parameters(), models[1].parameters(), strict=True):
                avg = 0.5 * pa + 0.5 * pb
                pa.copy_(avg)
                pb.copy_(avg)
    torch.testing.assert_close(got, flat_params(models[0]), rtol=0, atol=1e-6)


def test_biased_sampling_changes_what_the_slow_worker_reads():
    on, t_on = train_rounds("biased", [1, 4], 30)
    off, _ = train_rounds("biased", [1, 4], 30, options={"biased_sampling": False})
    assert t_on.scores is not None and torch.isfinite(t_on.scores.values).any()
    assert not torch.equal(on, off)


# ---------------------------------------------------------------------------- the virtual clock


def test_virtual_clock_charges_the_slowest_worker_and_the_waiting():
    _, sync = train_rounds("sync", [1, 4], 3, step_time_s=0.01)
    assert sync.clock.elapsed() == pytest.approx(3 * 4 * 0.04)  # 3 rounds of 4 steps, each gated by the 4x worker
    assert sync.clock.wait_s == pytest.approx([3 * 4 * 0.03, 0.0])
    _, biased = train_rounds("biased", [1, 4], 3, step_time_s=0.01)
    assert biased.steps == [4, 1]
    assert biased.clock.elapsed() == pytest.approx(3 * 4 * 0.01)  # nobody waits: 4 x 0.01 = 1 x 0.04
    assert biased.clock.wait_s == pytest.approx([0.0, 0.0])


def test_run_stops_at_the_budget_and_evaluates_on_schedule():
    t = trainer("biased", (1, 4), step_time_s=0.01)
    rows = []
    x, y = tiny_rows()
    last = t.run(time_budget_s=0.5, eval_every_s=0.2, eval_fn=lambda: t.evaluate(x, y), on_eval=rows.append)
    assert [r["time_s"] for r in rows] == pytest.approx([0.0, 0.2, 0.4, 0.52])
    assert last["time_s"] >= 0.5 and 0 <= last["accuracy"] <= 1 and rows[-1]["steps"] == [52, 13]


def test_real_clock_needs_one_process_per_worker():
    with pytest.raises(ConfigError, match="one process per worker"):
        trainer("biased", (1, 4), clock="real")


# ---------------------------------------------------------------------------- real processes (gloo)


def _two_processes(method: str, slowdowns, rounds: int, options=None, **kw) -> torch.Tensor:
    with launch(follower_rounds, 2, args=(method, slowdowns, rounds, options, kw), label="hetero worker",
                timeout_s=60):  # fmt: skip
        got, t = train_rounds(method, slowdowns, rounds, options, **kw)
        t.worker_stats()
    return got


@pytest.mark.parametrize("method", ["sync", "biased"])
def test_two_processes_give_the_one_process_result(method):
    """sync: torch DDP (one worker per process) against the hand-written gradient average; biased: the weighted
    all-reduce and the MIN-merged loss table against one process hosting both workers."""
    one, _ = train_rounds(method, [1, 4], 14, options={"beta": 1} if method == "biased" else None)
    two = _two_processes(method, [1, 4], 14, options={"beta": 1} if method == "biased" else None)
    torch.testing.assert_close(two, one, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("peer", "timeout_s", "message"),
    [
        (dies_after_one_round, 30, r"^hetero worker 1 failed: exited with code 3"),
        (stops_answering, 3, r"^a hetero worker stopped answering \(collectives time out after 3 s\)"),
    ],
    ids=["dies", "stops-answering"],
)
def test_a_lost_worker_is_one_clear_error_and_no_process_is_left(peer, timeout_s, message):
    with pytest.raises(LeantrainError, match=message):
        with launch(peer, 2, label="hetero worker", timeout_s=timeout_s):
            t = trainer("biased", (1, 4))
            for _ in range(50):
                t.train_round()
    _assert_gone(spawned_pids())


def _assert_gone(pids: list[int]) -> None:
    assert pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_wall_clock_sleeps_the_emulated_slowdown_unless_told_not_to():
    import time

    from leantrain.hetero import WallClock

    emulated = WallClock([1, 4], hosted=[1])
    started = time.perf_counter()
    emulated.worked(1, 2, 0.02)
    assert time.perf_counter() - started >= 0.06 and emulated.busy_s[1] == pytest.approx(0.08)
    real = WallClock([1, 4], hosted=[1], emulate=False)  # devices that really differ: no sleeping
    started = time.perf_counter()
    real.worked(1, 2, 0.02)
    assert time.perf_counter() - started < 0.05 and real.busy_s[1] == pytest.approx(0.02) and real.steps[1] == 2
