"""AsyncSAM's two-process mode against SGD and SAM on one core and on two threads (``bench optim --part async``).

The paper's system runs the descent on a fast device and the ascent on an otherwise idle slower one. Here both are
cores of one CPU: the training ("fast") process is pinned to core 0 with 1 thread; the ascent process to core 1
with 1 thread. A slower ascent device is emulated by ``slowdown=s``: the worker repeats each ascent
forward/backward s times (real compute on its core, not sleep), and the system-aware rule then picks a smaller b'.

Each setting runs in a fresh process (``python -m leantrain.bench.optim_async '<json>'``) so thread counts and
core pinning never leak between settings; settings are interleaved across repeats (sgd-1core, sgd-2threads,
sam-1core, ..., then again). A process trains ResNet-20 on Fashion-MNIST rows at batch 128 and reports the wall time
of every step, the one-time start cost of the two-process mode (forking the worker, profiling b'; paid inside the
first steps) and the worker's statistics. Reported per setting: the median step time after the warm-up steps
(where the start cost lands), its ratio to SGD on one core, and the projected wall-clock of one full Fashion-MNIST
epoch (469 steps) = start cost + 469 × median, against SGD's.

On CPU the "idle" second core is not free the way a CPU beside a GPU is: SGD with 2 threads on both cores is the
fair comparison for anyone who owns only this CPU, so it is reported too.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from leantrain.bench.optim_step import one_step, setup
from leantrain.bench.report import Progress, discard

EPOCH_STEPS = 469  # one Fashion-MNIST epoch at batch 128 (60,000 images)

SETTINGS = {
    "sgd-1core": {"optim": "sgd", "cores": [0], "threads": 1},
    "sgd-2threads": {"optim": "sgd", "cores": None, "threads": 2},
    "sam-1core": {"optim": "sam", "cores": [0], "threads": 1},
    "sam-2threads": {"optim": "sam", "cores": None, "threads": 2},
    "asyncsam-2proc-s1": {"optim": "asyncsam", "cores": [0], "threads": 1, "slowdown": 1},
    "asyncsam-2proc-s2": {"optim": "asyncsam", "cores": [0], "threads": 1, "slowdown": 2},
    "asyncsam-2proc-s4": {"optim": "asyncsam", "cores": [0], "threads": 1, "slowdown": 4},
    "asyncsam-2proc-s4-reuse": {"optim": "asyncsam", "cores": [0], "threads": 1, "slowdown": 4, "on_miss": "reuse"},
}


def measure(setting: dict, steps: int, warmup: int) -> dict:
    """Train ``warmup + steps`` steps in this process under ``setting``; every step's wall time and the stats."""
    if setting["cores"] is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(setting["cores"]))
    torch.set_num_threads(setting["threads"])
    overrides = ["data.train_subset=3840", f"threads={setting['threads']}"]
    if setting["optim"] == "asyncsam":
        overrides += [
            "optim.mode=two_process", f"optim.slowdown={setting['slowdown']}", "optim.worker_cpu=1",
            f"optim.on_miss={setting.get('on_miss', 'wait')}",
        ]  # fmt: skip
    model, opt, batches, task = setup(setting["optim"], overrides)
    model.train()
    times = []
    started = time.perf_counter()
    try:
        for i in range(warmup + steps):
            times.append(one_step(model, opt, task, batches[i % len(batches)]))
    finally:
        close = getattr(opt, "close", None)
        if callable(close):
            close()
    stats = getattr(opt, "async_stats", None)
    out = {"times": times, "total_s": time.perf_counter() - started}
    if stats:
        sizes = stats["ascent_batch_size"]
        ages = {str(k): n for k, n in stats["staleness"].items()}
        out.update(
            misses=stats["misses"], wait_s=stats["wait_s"], staleness=ages,
            ascent_batch_mean=sum(k * v for k, v in sizes.items()) / max(sum(sizes.values()), 1),
            ascent_batch_last=max(sizes, key=sizes.get) if sizes else None,
        )  # fmt: skip
    return out


def _run_setting(name: str, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, "-m", "leantrain.bench.optim_async", json.dumps(SETTINGS[name]), str(steps), str(warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": str(SETTINGS[name]["threads"])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        from leantrain.errors import LeantrainError

        raise LeantrainError(f"bench setting {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def async_rows(repeats: int, steps: int, warmup: int, log, settings: tuple[str, ...] | None = None,
               add=discard) -> list[dict]:  # fmt: skip
    """One row per setting, finished (and passed to ``add``) in the last repeat.

    The anchor sgd-1core (else the first setting) runs first in every repeat, so every row's ratios to it are known
    when the row is finished.
    """
    names = sorted(settings or tuple(SETTINGS), key=lambda name: name != "sgd-1core")  # stable: anchor first
    results: dict[str, list[dict]] = {name: [] for name in names}
    progress = Progress("optim async", repeats * len(names))
    rows = []
    for rep in range(repeats):
        for name in names:
            with progress.unit(f"{name} repeat {rep}"):
                r = _run_setting(name, steps, warmup)
                results[name].append(r)
                extra = f", b' {r['ascent_batch_mean']:.0f}, misses {r['misses']}" if "misses" in r else ""
                log(f"  {name:<24} repeat {rep}: median {statistics.median(r['times'][warmup:]):.3f} s/step{extra}")
            if rep == repeats - 1:
                rows.append(_setting_row(name, results[name], warmup, repeats, base=rows[0] if rows else None))
                add(rows[-1])
    return rows


def _setting_row(name: str, runs: list[dict], warmup: int, repeats: int, base: dict | None) -> dict:
    """The row of one setting; ``base`` is the anchor's row (None: this is the anchor)."""
    steady = [t for r in runs for t in r["times"][warmup:]]
    med = statistics.median(steady)
    # the one-time start cost: how much longer the warm-up steps took than steady-state steps
    start_cost = statistics.median(sum(r["times"][:warmup]) - warmup * med for r in runs)
    extra = {"steps_timed": len(steady), "repeats": repeats, "start_cost_s": max(start_cost, 0.0),
             "epoch_s_projected": max(start_cost, 0.0) + EPOCH_STEPS * med, "setting": SETTINGS[name]}  # fmt: skip
    for key in ("misses", "wait_s", "ascent_batch_mean"):
        if key in runs[0]:
            extra[key] = statistics.median(r[key] for r in runs)
    anchor = base or {"step_time_s_median": med, "extra": extra}  # the anchor's own ratios are 1
    extra["ratio_to_sgd_1core"] = med / anchor["step_time_s_median"]
    extra["epoch_ratio_to_sgd_1core"] = extra["epoch_s_projected"] / anchor["extra"]["epoch_s_projected"]
    return {"method": name, "anchor": name == "sgd-1core", "model": "resnet20", "task": "fashion-mnist-b128",
            "step_time_s_median": med, "extra": extra}  # fmt: skip


def targets(rows: list[dict]) -> dict[str, bool]:
    """AsyncSAM wall-clock ≤ 1.15× SGD at equal epochs (the b'-rule setting without emulated slowdown, s = 1)."""
    r = {row["method"]: row["extra"] for row in rows}
    out = {}
    for name in ("asyncsam-2proc-s1", "asyncsam-2proc-s2", "asyncsam-2proc-s4"):
        if name in r and "sgd-1core" in r:
            out[f"{name}_epoch<=1.15x_sgd_1core"] = r[name]["epoch_ratio_to_sgd_1core"] <= 1.15
    return out


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
