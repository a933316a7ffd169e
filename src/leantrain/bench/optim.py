"""``leantrain bench optim``: SAM, LW-SAM and AsyncSAM (single-process) against SGD on ResNet-20 / Fashion-MNIST.

Parts (``--part``):

- ``steptime``: median time of one optimizer step (forward, backward(s), update) on batch 128, 1 thread, the
  optimizers interleaved in one process (sgd, sam, lwsam, lwsam-masked, asyncsam, sgd, ...), after warm-up steps;
  LW-SAM first runs its own warm-up (plain steps before its first layer selection) untimed.
- ``accuracy``: every optimizer through its shipped recipe (``<name>-resnet20-fashion-mnist``) on a 12k-image
  subset for 3 epochs (``--quick``: 6k images, 1 epoch), 1 thread, two runs at a time in fresh processes
  (asyncsam-2proc alone); test accuracy mean ± std, wall-clock, and the full-model gradient norm at the end
  (on the first 1,024 training images, model in eval mode) -- the suppression LW-SAM claims. With the step-time
  part in the same run, SAM and SGD are also trained for LW-SAM's wall-clock (``*-equal-time``: their step count
  set from the measured step-time ratios, so the budget does not depend on the load during the accuracy runs).

- ``async``: AsyncSAM's two-process mode against SGD and SAM on one core and on two threads
  (:mod:`leantrain.bench.optim_async`).
- ``mlbfgs``: mL-BFGS on an ill-conditioned task against SGD, Adam and plain stochastic L-BFGS, and its step time
  (:mod:`leantrain.bench.optim_quasi_newton`).

Targets from the issue are evaluated and printed, never tuned for.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from leantrain.bench import optim_async, optim_quasi_newton
from leantrain.bench.optim_step import cycle, one_step, setup
from leantrain.bench.report import BenchResults, Progress, discard, log, markdown_table, mean_std, print_targets
from leantrain.errors import ConfigError

# step-time arms: (recipe prefix, overrides). LW-SAM is timed after its warm-up: the steps before its first layer
# selection (the recipe's LR warm-up) are plain steps, run untimed first, so the chosen layers are those of training.
STEP_ARMS = {
    "sgd": ("sgd", []), "sam": ("sam", []), "lwsam": ("lwsam", []),
    "lwsam-masked": ("lwsam", ["optim.second_pass=masked"]), "asyncsam": ("asyncsam", ["optim.mode=sequential"]),
}  # fmt: skip
QUICK = ["data.train_subset=6000", "data.eval_subset=2000", "train.epochs=1", "train.warmup_steps=10"]
# The recipes' full setting (60k images, 5 epochs) takes about 6 CPU-hours for 4 optimizers x 3 seeds here, so the
# standard benchmark trains on a fixed 12k-image subset for 3 epochs (full 10k test set); `leantrain run
# <name>-resnet20-fashion-mnist` is the full setting.
STANDARD = ["data.train_subset=12000", "train.epochs=3", "train.warmup_steps=30"]


def steptime_rows(repeats: int, steps: int, log, add=discard) -> list[dict]:
    """One row per optimizer, each finished (and passed to ``add``) in the last repeat; SGD runs first."""
    torch.set_num_threads(1)
    setups = {name: setup(recipe, ["threads=1", *extra]) for name, (recipe, extra) in STEP_ARMS.items()}
    batches = {name: cycle(s[2]) for name, s in setups.items()}
    for name, (model, opt, _, task) in setups.items():
        model.train()
        for _ in range(getattr(opt, "select_after", 0)):  # LW-SAM's warm-up: plain steps, untimed
            one_step(model, opt, task, next(batches[name]))
    times: dict[str, list[float]] = {name: [] for name in STEP_ARMS}
    progress = Progress("optim steptime", repeats * len(STEP_ARMS))
    rows = []
    for rep in range(repeats):
        for name, (model, opt, _, task) in setups.items():
            with progress.unit(f"{name} repeat {rep}"):
                model.train()
                for i in range(steps + 2):
                    t = one_step(model, opt, task, next(batches[name]))
                    if i >= 2:  # warm-up
                        times[name].append(t)
                log(f"  {name:<9} repeat {rep}: median {statistics.median(times[name][-steps:]):.3f} s")
            if rep == repeats - 1:
                med, ts = statistics.median(times[name]), times[name]
                rows.append({
                    "method": name, "anchor": name == "sgd", "model": "resnet20", "task": "fashion-mnist-b128",
                    "step_time_s_median": med,
                    "extra": {"ratio_to_sgd": med / statistics.median(times["sgd"]), "min": min(ts), "max": max(ts),
                              "steps_timed": len(ts), **_layer_choice(opt)},
                })  # fmt: skip
                add(rows[-1])
    return rows


def _layer_choice(opt) -> dict:
    """LW-SAM's chosen layers and how many modules its last second pass replayed (empty for other optimizers)."""
    if not hasattr(opt, "selection"):
        return {}
    return {"chosen_layers": [opt.layer_names[i] for i in opt.selection], "second_pass": opt.second_pass,
            "replayed_modules": opt.last_replayed, "warmup_steps": opt.select_after}  # fmt: skip


def _grad_norm(run_dir: Path) -> float:
    import yaml

    from leantrain.config import from_dict
    from leantrain.models.build import build_model_for_data
    from leantrain.runs.supervised import prepare_data
    from leantrain.train.checkpoint import list_checkpoints, load_checkpoint
    from leantrain.train.tasks import ClassificationTask

    cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    data = prepare_data(cfg)
    model = build_model_for_data(cfg.model.name, cfg.model.options, data.model_fields)
    load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1], model, None)
    model.eval()
    data.train.set_epoch(0)
    seen = 0
    for batch in data.train:
        loss, _ = ClassificationTask().loss(model, batch)
        (loss * len(batch["labels"])).backward()
        seen += len(batch["labels"])
        if seen >= 1024:
            break
    return float(torch.sqrt(sum((p.grad / seen).pow(2).sum() for p in model.parameters() if p.grad is not None)))


# accuracy rows: (recipe prefix, extra overrides); asyncsam-2proc is the paper's system (ascent process on core 1,
# system-aware b', wait policy) while the training process runs 1 thread. lwsam-at-init is LW-SAM with its first
# layers chosen at step 0 (the previous rule), lwsam chooses them after the LR warm-up (the shipped default).
ACCURACY_METHODS = {
    "sgd": ("sgd", []), "sam": ("sam", []), "lwsam": ("lwsam", []),
    "lwsam-at-init": ("lwsam", ["optim.select_after=0"]), "asyncsam": ("asyncsam", ["optim.mode=sequential"]),
    "asyncsam-2proc": ("asyncsam", ["optim.mode=two_process", "optim.worker_cpu=1"]),
}  # fmt: skip
DEFAULT_ACCURACY = ("sgd", "sam", "lwsam", "lwsam-at-init", "asyncsam-2proc")
# equal wall-clock arms: the anchor trained for LW-SAM's time budget, in steps of its own cost (step-time ratios)
EQUAL_TIME = {"sam-equal-time": "sam", "sgd-equal-time": "sgd"}


def _accuracy_run(recipe: str, overrides: list[str]) -> dict:
    """One recipe run (in a fresh worker process); its summary plus the end-of-training gradient norm."""
    from leantrain.config import resolve
    from leantrain.runs.launch import run

    summary = run(resolve(f"{recipe}-resnet20-fashion-mnist", overrides)).summary
    summary["grad_norm"] = _grad_norm(Path(summary["run_dir"]))
    return summary


def equal_time_steps(steps: int, warmup: int, ratios: dict[str, float], anchor: str) -> int:
    """Steps of ``anchor`` costing LW-SAM's wall-clock: its warm-up steps cost SGD's, the rest LW-SAM's ratio."""
    budget = warmup * 1.0 + (steps - warmup) * ratios["lwsam"]  # in SGD steps
    return max(1, round(budget / ratios[anchor]))


def accuracy_rows(seeds: int, quick: bool, log, methods: tuple[str, ...] = DEFAULT_ACCURACY, add=discard,
                  ratios: dict[str, float] | None = None, workers: int = 2) -> list[dict]:  # fmt: skip
    """One row per method over ``seeds`` seeds, passed to ``add`` when its last seed finishes.

    Runs go to ``workers`` fresh processes (1 thread each; ``workers=0``: in this process); asyncsam-2proc needs
    both cores and runs alone at the end. Then the equal-time arms, if ``ratios`` (step time / SGD's) are given.
    """
    base = [*(QUICK if quick else STANDARD), "threads=1", "progress=none"]
    results: dict[str, list[dict]] = {}
    rows: list[dict] = []
    warmup = int((QUICK if quick else STANDARD)[-1].split("=")[1])  # train.warmup_steps: LW-SAM's select_after
    with tempfile.TemporaryDirectory() as tmp:

        def job(name: str, seed: int, extra: list[str]) -> tuple[str, list[str]]:
            recipe = ACCURACY_METHODS[name][0] if name in ACCURACY_METHODS else EQUAL_TIME[name]
            overrides = ACCURACY_METHODS[name][1] if name in ACCURACY_METHODS else []
            return recipe, [*base, f"seed={seed}", f"output_dir={tmp}", *overrides, *extra]

        def finish(name: str, summaries: list[dict]) -> None:
            results[name] = summaries
            rows.append(_accuracy_row(name, summaries))
            add(rows[-1])

        solo = [m for m in methods if m == "asyncsam-2proc"]
        pooled = [m for m in methods if m not in solo]
        _run_jobs({(m, s): job(m, s, []) for m in pooled for s in range(seeds)}, workers, log, finish)
        _run_jobs({(m, s): job(m, s, []) for m in solo for s in range(seeds)}, 0, log, finish)
        if ratios and "lwsam" in results:
            steps = results["lwsam"][0]["steps"]
            arms = {name: equal_time_steps(steps, warmup, ratios, anchor) for name, anchor in EQUAL_TIME.items()}
            log(f"equal wall-clock arms (LW-SAM's {steps} steps, {warmup} of them warm-up): {arms}")
            jobs = {(m, s): job(m, s, [f"train.max_steps={n}"]) for m, n in arms.items() for s in range(seeds)}
            _run_jobs(jobs, workers, log, finish)
    return rows


def _run_jobs(jobs: dict[tuple[str, int], tuple[str, list[str]]], workers: int, log, finish) -> None:
    """Run every (method, seed) job; call ``finish(method, summaries)`` once all of a method's seeds are done."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
    from multiprocessing import get_context

    if not jobs:
        return
    pool = (ProcessPoolExecutor(workers, mp_context=get_context("spawn"), max_tasks_per_child=1) if workers
            else ThreadPoolExecutor(1))  # fmt: skip
    done: dict[str, dict[int, dict]] = {}
    seeds_of = {m: sorted(s for mm, s in jobs if mm == m) for m, _ in jobs}
    progress = Progress("optim accuracy", len(jobs))
    with pool:
        pending = {pool.submit(_accuracy_run, *spec): key for key, spec in jobs.items()}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                name, seed = pending.pop(future)
                with progress.unit(f"{name} seed {seed}"):
                    summary = future.result()
                acc = summary["final"]["test_accuracy"]
                log(f"  {name:<14} seed {seed}: test accuracy {acc:.4f}, {summary['steps']} steps, "
                    f"wall {summary['wall_time_s']:.0f} s")  # fmt: skip
                done.setdefault(name, {})[seed] = summary
                if len(done[name]) == len(seeds_of[name]):
                    finish(name, [done[name][s] for s in seeds_of[name]])


def _accuracy_row(name: str, runs: list[dict]) -> dict:
    mean, std = mean_std([r["final"]["test_accuracy"] for r in runs])
    return {
        "method": name, "anchor": name in ("sgd", "sam", *EQUAL_TIME), "model": "resnet20", "task": "fashion-mnist",
        "trainable_params": runs[0]["trainable_params"], "metric_name": "accuracy", "metric": mean,
        "seeds": len(runs), "metric_std": std,
        "extra": {"per_seed": [r["final"]["test_accuracy"] for r in runs],
                  "wall_time_s_median": statistics.median(r["wall_time_s"] for r in runs),
                  "grad_norm_median": statistics.median(r["grad_norm"] for r in runs), "steps": runs[0]["steps"],
                  "asyncsam": [r.get("asyncsam") for r in runs] if "asyncsam" in runs[0] else None,
                  "wall_clock_note": "two runs at a time (1 thread each) except asyncsam-2proc: indicative only; "
                  "the equal-time budgets come from the step-time part"},
    }  # fmt: skip


def targets(step: list[dict], acc: list[dict]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    s = {r["method"]: r["extra"]["ratio_to_sgd"] for r in step}
    if s:
        out["sam_step~2x_sgd (1.7-2.3)"] = 1.7 <= s["sam"] <= 2.3
        out["lwsam_step<=1.15x_sgd"] = s["lwsam"] <= 1.15
    a = {r["method"]: r for r in acc}
    if "sam" in a and "lwsam" in a:
        out["lwsam_acc>=sam-0.5pt"] = a["lwsam"]["metric"] >= a["sam"]["metric"] - 0.005
    if "sam-equal-time" in a and "lwsam" in a:
        out["lwsam_acc>=sam_at_equal_wall_clock"] = a["lwsam"]["metric"] >= a["sam-equal-time"]["metric"]
    for name in ("lwsam", "asyncsam", "asyncsam-2proc"):
        if name in a and "sgd" in a:
            out[f"{name}_acc>=sgd"] = a[name]["metric"] >= a["sgd"]["metric"]
    return out


PARTS = ("steptime", "accuracy", "async", "mlbfgs")


def run_bench(quick: bool, out_dir: Path, seeds: int | None = None, parts: tuple[str, ...] = PARTS) -> Path:
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ConfigError(f"bench optim: unknown part(s) {unknown}; choose from {list(PARTS)}")
    started = time.perf_counter()
    area = "optim" if set(parts) == set(PARTS) else "optim-" + "-".join(p for p in PARTS if p in parts)
    results = BenchResults(area, out_dir, threads=1, quick=quick)
    step, acc, two, curve, qn_step = [], [], [], [], []
    if "steptime" in parts:
        log("step time: ResNet-20, batch 128, 1 thread, interleaved")
        step = steptime_rows(repeats=2 if quick else 5, steps=5 if quick else 10, log=log, add=results.add)
    if "async" in parts:
        log("AsyncSAM two-process mode: ResNet-20, batch 128, a fresh process per setting, interleaved")
        two = optim_async.async_rows(repeats=1 if quick else 3, steps=8 if quick else 30, warmup=6, log=log,
                                     add=results.add)  # fmt: skip
    if "mlbfgs" in parts:
        log("mL-BFGS: ill-conditioned digits (loss curves), then step time on the mlbfgs-cnn recipe")
        curve = optim_quasi_newton.curve_rows(seeds or (2 if quick else 5), quick, log, add=results.add)
        qn_step = optim_quasi_newton.steptime_rows(repeats=2 if quick else 5, steps=5 if quick else 20, log=log,
                                                   add=results.add)  # fmt: skip
    if "accuracy" in parts:
        log("accuracy: ResNet-20 on Fashion-MNIST through the shipped recipes")
        ratios = {r["method"]: r["extra"]["ratio_to_sgd"] for r in step} or None
        if ratios is None:
            log("  (no step-time part in this run: the equal wall-clock arms are skipped)")
        acc = accuracy_rows(seeds or (1 if quick else 3), quick, log=log, add=results.add, ratios=ratios)
    met = targets(step, acc)
    met.update(optim_async.targets(two))
    if curve or qn_step:
        met.update(optim_quasi_newton.targets(curve, qn_step))
    path = results.finish({"targets": met, "wall_time_s": round(time.perf_counter() - started, 1)})
    if step:
        for r in step:
            r["ratio_to_sgd"] = r["extra"]["ratio_to_sgd"]
        print(
            "Step time (ResNet-20, batch 128, 1 thread)\n"
            + markdown_table(step, ["method", "step_time_s_median", "ratio_to_sgd"])
        )
    if two:
        shown = ["ratio_to_sgd_1core", "start_cost_s", "epoch_s_projected", "epoch_ratio_to_sgd_1core",
                 "ascent_batch_mean", "misses"]  # fmt: skip
        for r in two:
            r.update({k: r["extra"].get(k) for k in shown})
        cols = ["method", "step_time_s_median", *shown]
        print("\nAsyncSAM two-process (ResNet-20, batch 128; fast process on core 0, ascent on core 1)\n"
              + markdown_table(two, cols))  # fmt: skip
    if curve or qn_step:
        if curve:
            optim_quasi_newton.plot_curves(curve, out_dir / "mlbfgs-curves.png")
        print("\nmL-BFGS (ill-conditioned digits; step time on the mlbfgs-cnn recipe)")
        for rows, cols in ((curve, optim_quasi_newton.CURVE_COLUMNS), (qn_step, optim_quasi_newton.STEP_COLUMNS)):
            if rows:
                print(markdown_table(rows, list(cols)))
    if acc:
        for r in acc:
            r.update(grad_norm=r["extra"]["grad_norm_median"], wall_s=r["extra"]["wall_time_s_median"])
        cols = ["method", "metric", "metric_std", "seeds", "wall_s", "grad_norm"]
        print("\nAccuracy (ResNet-20, Fashion-MNIST)\n" + markdown_table(acc, cols))
    print_targets(met, path)
    return path
