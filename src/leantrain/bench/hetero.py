"""``leantrain bench hetero``: synchronous SGD, uniform local SGD and biased local SGD across a fast and a slow worker.

Setting (issue 21; spec federated §7.5): the small CNN (conv 16-32, hidden 64) on Fashion-MNIST (54k training rows,
the official 10k test rows), 2 workers, the second 2x or 4x slower, batch 64 per worker, SGD momentum 0.9, weight
decay 1e-4 (the paper's settings), ``period_steps`` 32 (the code's GPU_interval). Parts (``--part``):

- ``accuracy``: accuracy against time on the **virtual clock** (a speed-1 step costs 0.01 virtual s; deterministic,
  so runs may share the machine): every arm trains for the same 30 virtual seconds. Each arm's learning rate is
  chosen from {0.02, 0.05, 0.1} on validation rows (seed 0, mean of the last 3 evaluations), then 3 seeds run on the
  test rows (evaluated every 3 virtual s). Reported per arm: final test accuracy (mean of the last 3
  evaluations), its spread over seeds, the epochs done, and the virtual time at which the seed-mean curve first
  reaches synchronous SGD's final accuracy.
- ``ablation``: at 4x, biased local SGD with step-weighted aggregation (``beta = 1``) and without loss-biased
  sampling, each with its own tuned learning rate (which part of the bias matters).
- ``timing``: **real processes** (2 gloo processes on loopback, one torch thread each; the slow worker sleeps
  (s - 1) x its compute), 8 s of training per run, slowdowns 1 (the slow-free case), 2 and 4, median of 3 repeats:
  per-worker steps, busy and waiting seconds; besides the three arms, ``biased-period`` (each worker steps until it
  has been busy 0.6 s per round, weights by steps taken: ``hetero.period_s``). Repeats are interleaved (every arm
  once, then again). Run it on a quiet machine (nothing else running).

Rows: ``method`` is ``sync``, ``local-uniform``, ``biased`` (ablations ``biased-beta1``, ``biased-nosampling``),
``task`` names the slowdown and the part. Targets (reported, never tuned for): biased reaches sync's accuracy in less
time; at equal time it is at least as accurate; its waiting at synchronisation is <= 30% of the slow-free run's
total time.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from leantrain.bench.report import BenchResults, Progress, discard, log, markdown_table, mean_std, print_targets

ARMS = {"sync": ("sync", {}), "local-uniform": ("local-uniform", {}), "biased": ("biased", {})}
# The timing part also runs biased local SGD with a time-budgeted period (hetero.period_s: each worker steps until it
# has been busy PERIOD_S seconds, weights by the steps taken): the mode for devices whose speeds are not known.
TIMING_ARMS = {**ARMS, "biased-period": ("biased", {"beta": 1})}
PERIOD_S = 0.6
ABLATIONS = {"biased-beta1": ("biased", {"beta": 1}), "biased-nosampling": ("biased", {"biased_sampling": False})}
FULL = {"slowdowns": (2, 4), "budget_s": 30.0, "eval_every_s": 3.0, "lrs": (0.02, 0.05, 0.1),
        "timing_s": 8.0, "repeats": 3, "timing_slowdowns": (1, 2, 4)}  # fmt: skip
QUICK = {"slowdowns": (4,), "budget_s": 4.0, "eval_every_s": 1.0, "lrs": (0.05,), "timing_s": 3.0, "repeats": 1,
         "timing_slowdowns": (1, 4)}  # fmt: skip
WINDOW = 3  # evaluations averaged for "final" accuracy
WAIT_LIMIT = 0.30


def _overrides(method: str, options: dict, slowdown: float, lr: float, seed: int, extra: list[str]) -> list[str]:
    opts = "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()) + "}"
    return [f"hetero.method={method}", f"hetero.options={opts}", f"hetero.slowdowns=[1,{slowdown:g}]",
            f"optim.lr={lr:g}", f"seed={seed}", "threads=1", "progress=none", *extra]  # fmt: skip


def curve(job: dict) -> dict:
    """One virtual-clock run (in a worker process): its evaluation records."""
    import torch

    from leantrain.config import resolve
    from leantrain.hetero.run import build_trainer

    torch.set_num_threads(1)
    overrides = _overrides(job["method"], job["options"], job["slowdown"], job["lr"], job["seed"],
                           [f"hetero.eval_split={job['split']}"])  # fmt: skip
    cfg = resolve("hetero-biased-fashion-mnist", overrides)
    trainer, (ex, ey) = build_trainer(cfg)
    records: list[dict] = []
    started = time.perf_counter()
    trainer.run(time_budget_s=job["budget_s"], eval_every_s=job["eval_every_s"],
                eval_fn=lambda: trainer.evaluate(ex, ey), on_eval=records.append)  # fmt: skip
    return {**job, "records": records, "wall_s": time.perf_counter() - started}


def _final(records: list[dict]) -> float:
    """Accuracy at the end of a run: the mean of its last ``WINDOW`` evaluations."""
    return statistics.fmean(r["accuracy"] for r in records[-WINDOW:])


def _map(jobs: list[dict], units: Progress) -> list[dict]:
    """Run ``jobs`` on 2 worker processes (one thread each); results in job order."""
    import multiprocessing as mp

    def label(j: dict) -> str:
        return f"{j['arm']} {j['slowdown']:g}x lr {j['lr']:g} seed {j['seed']} ({j['split']})"

    if len(jobs) == 1:
        with units.unit(label(jobs[0])):
            return [curve(jobs[0])]
    out: list[dict | None] = [None] * len(jobs)
    with mp.get_context("spawn").Pool(2) as pool:
        for i, res in enumerate(pool.imap(curve, jobs)):
            log(f"[{units.label}] {label(res)}: final {_final(res['records']):.4f} in {res['wall_s']:.0f} s")
            out[i] = res
    return out  # type: ignore[return-value]


def _tuned(arm: str, method: str, options: dict, slowdown: float, s: dict, units: Progress) -> tuple[float, dict]:
    if len(s["lrs"]) == 1:
        return s["lrs"][0], {}
    common = {"arm": arm, "method": method, "options": options, "slowdown": slowdown, "seed": 0, "split": "val",
              "budget_s": s["budget_s"], "eval_every_s": s["eval_every_s"]}  # fmt: skip
    jobs = [{**common, "lr": lr} for lr in s["lrs"]]
    scores = {f"{j['lr']:g}": round(_final(j["records"]), 4) for j in _map(jobs, units)}
    best = max(scores, key=lambda k: scores[k])
    return float(best), scores


def _first_time(times: list[float], accs: list[float], target: float) -> float | None:
    return next((t for t, a in zip(times, accs, strict=True) if a >= target), None)


def accuracy_rows(part: str, seeds: int, quick: bool, add=discard) -> list[dict]:
    """The ``accuracy`` (ARMS at every slowdown) or ``ablation`` (ABLATIONS at 4x) rows on the virtual clock."""
    s = QUICK if quick else FULL
    rows: list[dict] = []
    arms = ARMS if part == "accuracy" else ABLATIONS
    slowdowns = s["slowdowns"] if part == "accuracy" else (4,)
    for slowdown in slowdowns:
        units = Progress(f"hetero accuracy {slowdown:g}x")
        for arm, (method, options) in arms.items():
            lr, grid = _tuned(arm, method, options, slowdown, s, units)
            jobs = [{"arm": arm, "method": method, "options": options, "slowdown": slowdown, "lr": lr, "seed": seed,
                     "split": "test", "budget_s": s["budget_s"], "eval_every_s": s["eval_every_s"]}
                    for seed in range(seeds)]  # fmt: skip
            runs = _map(jobs, units)
            finals = [_final(r["records"]) for r in runs]
            mean, std = mean_std(finals)
            times = [r["time_s"] for r in runs[0]["records"]]
            length = min(len(r["records"]) for r in runs)
            curve_mean = [statistics.fmean(r["records"][i]["accuracy"] for r in runs) for i in range(length)]
            last = runs[0]["records"][-1]
            row = {
                "method": arm, "anchor": "sync", "model": "cnn-16-32", "task": f"fashion-mnist-{slowdown:g}x",
                "metric_name": "test_accuracy", "metric": round(mean, 4), "metric_std": round(std, 4),
                "seeds": seeds,
                "extra": {
                    "part": part, "slowdown": slowdown, "clock": "virtual", "lr": lr, "lr_grid_val": grid,
                    "time_budget_s": s["budget_s"], "time_s": last["time_s"], "finals": [round(f, 4) for f in finals],
                    "epochs": last["epoch"], "steps": last["steps"], "wait_share": last["wait_share"],
                    "curve_time_s": times[:length], "curve_accuracy": [round(a, 4) for a in curve_mean],
                    "curve_epoch": [r["epoch"] for r in runs[0]["records"][:length]],
                    "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 1),
                },
            }  # fmt: skip
            rows.append(row)
            add(row)
    return rows


def compare_to_sync(rows: list[dict]) -> None:
    """Fill each virtual-clock row's time to reach sync's final accuracy (same slowdown), and its accuracy once it
    has read as many epochs as sync did, from the seed-mean curves."""
    curves = [r for r in rows if r["extra"].get("clock") == "virtual"]
    for r in curves:
        e = r["extra"]
        sync = next((q for q in curves if q["method"] == "sync" and q["extra"]["slowdown"] == e["slowdown"]), None)
        if sync is None:
            continue
        target, sync_epochs = sync["metric"], sync["extra"]["epochs"]
        e["target_sync_final"] = target
        e["time_to_sync_final_s"] = _first_time(e["curve_time_s"], e["curve_accuracy"], target)
        at = [a for a, ep in zip(e["curve_accuracy"], e["curve_epoch"], strict=True) if ep <= sync_epochs + 1e-9]
        e["accuracy_at_sync_epochs"] = at[-1] if at else None


def timing_rows(quick: bool, add=discard) -> list[dict]:
    """Real processes: per-worker steps, busy and waiting seconds, medians over repeats."""
    from leantrain.config import resolve
    from leantrain.runs.launch import run

    s = QUICK if quick else FULL
    units = Progress("hetero timing", len(s["timing_slowdowns"]) * len(TIMING_ARMS) * s["repeats"])
    rows = []
    cells = [(slowdown, arm) for slowdown in s["timing_slowdowns"] for arm in TIMING_ARMS]
    runs: dict[tuple, list[dict]] = {cell: [] for cell in cells}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(s["repeats"]):  # interleaved: every cell once per repeat
            for slowdown, arm in cells:
                method, options = TIMING_ARMS[arm]
                period = [f"hetero.period_s={PERIOD_S}"] if arm == "biased-period" else []
                with units.unit(f"{arm} {slowdown:g}x repeat {rep}"):
                    cfg = resolve("hetero-biased-fashion-mnist", _overrides(
                        method, options, slowdown, 0.05, rep,
                        ["hetero.clock=real", f"hetero.time_budget_s={s['timing_s']}", "hetero.eval_every_s=null",
                         "data.eval_subset=500", f"output_dir={tmp}", *period]))  # fmt: skip
                    runs[(slowdown, arm)].append(run(cfg).summary)
    for (slowdown, arm), done in runs.items():

        def med(key: str, j: int, done=done) -> float:
            return round(statistics.median(r[key][j] for r in done), 4)

        time_s = statistics.median(r["time_s"] for r in done)
        row = {
            "method": arm, "anchor": "sync", "model": "cnn-16-32", "task": f"fashion-mnist-{slowdown:g}x-real",
            "metric_name": "wait_share", "metric": round(statistics.median(r["wait_share"] for r in done), 4),
            "seeds": s["repeats"],
            "extra": {
                "part": "timing", "slowdown": slowdown, "clock": "real", "processes": 2, "threads": 1,
                "time_s": round(time_s, 3), "steps": [med("steps", 0), med("steps", 1)],
                "busy_s": [med("busy_s", 0), med("busy_s", 1)], "wait_s": [med("wait_s", 0), med("wait_s", 1)],
                "steps_per_s": round((med("steps", 0) + med("steps", 1)) / time_s, 2),
                "local_steps": done[0]["local_steps"], "period_s": PERIOD_S if arm == "biased-period" else None,
            },
        }  # fmt: skip
        rows.append(row)
        add(row)
    free = {r["method"]: r for r in rows if r["extra"]["slowdown"] == 1}
    for r in rows:
        base = free.get(r["method"])
        if base is not None:
            r["extra"]["max_wait_vs_slowfree_total"] = round(max(r["extra"]["wait_s"]) / base["extra"]["time_s"], 4)
    return rows


def targets(rows: list[dict]) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    acc = [r for r in rows if r["extra"].get("part") == "accuracy"]
    for slowdown in sorted({r["extra"]["slowdown"] for r in acc}):
        by = {r["method"]: r for r in acc if r["extra"]["slowdown"] == slowdown}
        if {"sync", "biased"} <= set(by):
            t_b, t_s = by["biased"]["extra"]["time_to_sync_final_s"], by["sync"]["extra"]["time_to_sync_final_s"]
            out[f"biased_reaches_sync_accuracy_sooner_{slowdown:g}x"] = (
                t_b is not None and t_s is not None and t_b < t_s
            )
            out[f"biased>=sync_at_equal_time_{slowdown:g}x"] = by["biased"]["metric"] >= by["sync"]["metric"]
    timing = [r for r in rows if r["extra"].get("part") == "timing" and r["method"] == "biased"]
    for r in timing:
        if r["extra"]["slowdown"] > 1 and "max_wait_vs_slowfree_total" in r["extra"]:
            out[f"biased_wait<={WAIT_LIMIT:.0%}_of_slowfree_total_{r['extra']['slowdown']:g}x"] = (
                r["extra"]["max_wait_vs_slowfree_total"] <= WAIT_LIMIT
            )
    return out


def plot(rows: list[dict], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leantrain.bench.report import save_figure

    acc = [r for r in rows if r["extra"].get("part") == "accuracy"]
    slowdowns = sorted({r["extra"]["slowdown"] for r in acc})
    if not slowdowns:
        return None
    fig, axes = plt.subplots(1, len(slowdowns), figsize=(5 * len(slowdowns), 3.6), squeeze=False)
    for ax, slowdown in zip(axes[0], slowdowns, strict=True):
        for r in acc:
            if r["extra"]["slowdown"] == slowdown:
                label = f"{r['method']} (lr {r['extra']['lr']:g})"
                ax.plot(r["extra"]["curve_time_s"], r["extra"]["curve_accuracy"], label=label)
        ax.set_title(f"fast + {slowdown:g}x slower worker (virtual clock)")
        ax.set_xlabel("virtual seconds (0.01 s per full-speed step)")
        ax.set_ylabel(f"test accuracy (mean of {acc[0]['seeds']} seeds)")
        ax.set_ylim(0.5, 0.92)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    return save_figure(fig, path)


PARTS = ("accuracy", "ablation", "timing")


def run_bench(quick: bool, out_dir: Path, seeds: int | None = None, parts: tuple[str, ...] = PARTS) -> None:
    from leantrain.errors import ConfigError

    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ConfigError(f"unknown hetero bench part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    seeds = seeds or (1 if quick else 3)
    path = Path(out_dir) / "hetero.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    # Parts run one at a time (the timing part on a quiet machine) leave one document: rows of other parts stay.
    kept = [r for r in doc.get("rows", []) if doc.get("quick") == quick and r["extra"].get("part") not in parts]
    results = BenchResults("hetero", out_dir, threads=1, quick=quick)
    results.rows = kept
    started = time.perf_counter()
    for part in PARTS:
        if part in parts:
            if part == "timing":
                timing_rows(quick, results.add)
            else:
                accuracy_rows(part, seeds, quick, results.add)
    rows = results.rows
    compare_to_sync(rows)
    met = targets(rows)
    figure = plot(rows, Path(out_dir) / "hetero_accuracy_time.png")
    info = {"finished": time.strftime("%Y-%m-%d %H:%M"), "seeds": seeds,
            "wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip
    runs = {**doc.get("runs", {}), **{p: info for p in parts}}
    path = results.finish({"targets": met, "runs": runs, "figure": str(figure) if figure else None,
                           "settings": QUICK if quick else FULL})  # fmt: skip
    table = [{"method": r["method"], "task": r["task"], "metric": r["metric_name"], "value": r["metric"],
              "std": r.get("metric_std"), "lr": r["extra"].get("lr"), "time_s": r["extra"].get("time_s"),
              "to_sync_acc_s": r["extra"].get("time_to_sync_final_s"), "epochs": r["extra"].get("epochs"),
              "steps": r["extra"].get("steps"), "wait_s": r["extra"].get("wait_s")} for r in rows]  # fmt: skip
    print(markdown_table(table, list(table[0]) if table else []))
    print_targets(met, path)
