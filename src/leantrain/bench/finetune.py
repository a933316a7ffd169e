"""``leantrain bench finetune``: GEM and PaCA against LoRA and full fine-tuning.

Two parts, both run by this command and written to ``bench-results/finetune.json``:

- **Accuracy**: MiniLM on tweet sentiment, every method through its shipped recipe (same data, steps and
  schedule), seeds interleaved (seed 0 of every method, then seed 1, ...). Full fine-tuning, LoRA (r=8 on
  query/value), GEM at 0.1% and 1% of all weights, GEM's gradient-only and random-mask ablations (0.1%),
  PaCA with its rank matched to LoRA's parameter count (r=16: 16x384 = 8x(384+384) per layer).
- **Cost**: SmolLM2-135M causal LM, batch 4 x 64 tokens, 1 thread: LoRA (r=8 on q/v), PaCA at equal
  trainable parameters (r=20: 20x(576+192) = 8x(576+576) + 8x(576+192) per layer) and full fine-tuning,
  each in a fresh process (:mod:`leantrain.bench.finetune_cost`), processes interleaved over repeats.

Targets from the issue are evaluated and printed, never tuned for.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from leantrain.bench.report import BenchResults, Progress, discard, log, markdown_table, mean_std, print_targets
from leantrain.errors import LeantrainError

SMOLLM_TARGETS = ["q_proj", "v_proj"]
COST_METHODS = {
    "full": {},
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": SMOLLM_TARGETS},
    "paca": {"r": 20, "paca_alpha": 40, "target_modules": SMOLLM_TARGETS, "random_seed": 0},
}
ACCURACY_METHODS = {  # row name -> (recipe, overrides)
    "full": ("full-minilm-tweets", []),
    "lora": ("lora-minilm-tweets", []),
    "gem-0.1%": ("gem-minilm-tweets", []),
    "gem-1%": ("gem-minilm-tweets", ["finetune.density=0.01"]),
    "gem-gradient-only-0.1%": ("gem-minilm-tweets", ["finetune.score=gradient"]),
    "gem-random-0.1%": ("gem-minilm-tweets", ["finetune.score=random"]),
    "paca": ("paca-minilm-tweets", []),
}
ANCHORS = {"full", "lora"}
QUICK = ["data.train_subset=960", "data.eval_subset=300"]  # 60 steps per method


def accuracy_rows(seeds: int, quick: bool, threads: int, log, add=discard) -> list[dict]:
    """One row per method over ``seeds`` seeds (interleaved), passed to ``add`` when its last seed finishes."""
    from leantrain.config import resolve
    from leantrain.runs.launch import run

    results: dict[str, list[dict]] = {name: [] for name in ACCURACY_METHODS}
    progress = Progress("finetune accuracy", seeds * len(ACCURACY_METHODS))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            for name, (recipe, overrides) in ACCURACY_METHODS.items():
                with progress.unit(f"{name} seed {seed}"):
                    extra = [f"seed={seed}", f"threads={threads}", "progress=none", f"output_dir={tmp}"]
                    cfg = resolve(recipe, [*overrides, *(QUICK if quick else []), *extra])
                    summary = run(cfg).summary
                    results[name].append(summary)
                    acc = summary["final"]["test_accuracy"]
                    log(f"  {name:<24} seed {seed}: test accuracy {acc:.4f}  ({summary['train_time_s']:.0f} s)")
                if seed == seeds - 1:
                    rows.append(_accuracy_row(name, results[name]))
                    add(rows[-1])
    return rows


def _accuracy_row(name: str, runs: list[dict]) -> dict:
    mean, std = mean_std([r["final"]["test_accuracy"] for r in runs])
    step = statistics.median(r["train_time_s"] / r["steps"] for r in runs)
    return {
        "method": name, "anchor": name in ANCHORS, "model": "minilm", "task": "tweets",
        "trainable_params": runs[0]["trainable_params"], "metric_name": "accuracy", "metric": mean,
        "seeds": len(runs), "metric_std": std, "step_time_s_median": step,
        "extra": {"per_seed": [r["final"]["test_accuracy"] for r in runs], "steps": runs[0]["steps"]},
    }  # fmt: skip


def cost_rows(repeats: int, steps: int, log, add=discard) -> list[dict]:
    """One row per method, each in a fresh process per repeat (interleaved), finished in the last repeat."""
    samples: dict[str, list[dict]] = {m: [] for m in COST_METHODS}
    progress = Progress("finetune cost", repeats * len(COST_METHODS))
    rows = []
    for rep in range(repeats):
        for method in COST_METHODS:  # interleaved: lora, paca, full, lora, paca, full, ...
            with progress.unit(f"{method} repeat {rep}"):
                samples[method].append(_cost_sample(method, steps))
                median = statistics.median(samples[method][-1]["step_times_s"])
                log(f"  {method:<5} repeat {rep}: median step {median:.3f} s")
            if rep == repeats - 1:
                rows.append(_cost_row(method, samples[method]))
                add(rows[-1])
    return rows


def _cost_sample(method: str, steps: int) -> dict:
    cmd = [sys.executable, "-m", "leantrain.bench.finetune_cost", "--method", method, "--steps", str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LeantrainError(f"cost worker for {method} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cost_row(method: str, runs: list[dict]) -> dict:
    times = [t for r in runs for t in r["step_times_s"]]
    return {
        "method": method, "anchor": method != "paca", "model": "smollm2-135m", "task": "shakespeare-4x64",
        "trainable_params": runs[0]["trainable_params"], "metric_name": None, "metric": None, "seeds": None,
        "step_time_s_median": statistics.median(times),
        "peak_mem_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "saved_activation_mb": runs[0]["saved_activation_mb"],
        "extra": {"step_time_s_min": min(times), "step_time_s_max": max(times), "steps_timed": len(times),
                  "saved_in_adapted_layers_mb": runs[0]["saved_in_adapted_layers_mb"],
                  "peak_mem_source": "ru_maxrss of a fresh process (model load included)",
                  "saved_bytes_source": "saved_tensors_hooks, one training step"},
    }  # fmt: skip


def targets(acc: list[dict], cost: list[dict]) -> dict[str, bool | None]:
    """The issue's targets, evaluated on the measured rows."""
    a = {r["method"]: r for r in acc}
    c = {r["method"]: r for r in cost}
    out: dict[str, bool | None] = {}
    if {"lora", "paca"} <= set(c):
        lora, paca = c["lora"], c["paca"]
        r_over_d = COST_METHODS["paca"]["r"] / 576
        out["paca_saved_in_layers<=r/d_in*lora"] = (
            paca["extra"]["saved_in_adapted_layers_mb"] <= r_over_d * lora["extra"]["saved_in_adapted_layers_mb"]
        )
        out["paca_step_time<=0.85*lora"] = paca["step_time_s_median"] <= 0.85 * lora["step_time_s_median"]
        out["paca_peak_mem<=0.9*lora"] = paca["peak_mem_mb"] <= 0.9 * lora["peak_mem_mb"]
    if {"gem-0.1%", "lora", "full", "gem-random-0.1%"} <= set(a):
        gem, lora, full, rnd = a["gem-0.1%"], a["lora"], a["full"], a["gem-random-0.1%"]
        out["gem>=lora_at_no_more_params"] = (
            gem["metric"] >= lora["metric"] and gem["trainable_params"] <= lora["trainable_params"]
        )
        out["gem_within_1std_of_full"] = abs(gem["metric"] - full["metric"]) <= max(full["metric_std"], 1e-12)
        out["gem>=random_mask"] = gem["metric"] >= rnd["metric"]
    return out


def run_bench(
    quick: bool, out_dir: Path, seeds: int | None = None, parts: tuple[str, ...] = ("accuracy", "cost")
) -> Path:
    started = time.perf_counter()
    results = BenchResults("finetune", out_dir, threads=1, quick=quick)
    acc, cost = [], []
    if "accuracy" in parts:
        log("accuracy: MiniLM on tweets")
        acc = accuracy_rows(seeds or (1 if quick else 3), quick, threads=2, log=log, add=results.add)
    if "cost" in parts:
        log("cost: SmolLM2-135M, batch 4 x 64, 1 thread, fresh process per method")
        cost = cost_rows(repeats=1 if quick else 3, steps=3 if quick else 5, log=log, add=results.add)
    met = targets(acc, cost)
    extra = {"targets": met, "wall_time_s": round(time.perf_counter() - started, 1), "accuracy_threads": 2}
    path = results.finish(extra)
    if acc:
        cols = ["method", "trainable_params", "metric", "metric_std", "seeds", "step_time_s_median"]
        print("Accuracy (MiniLM, tweets; test accuracy mean over seeds)\n" + markdown_table(acc, cols) + "\n")
    if cost:
        for r in cost:
            r["saved_in_layers_mb"] = r["extra"]["saved_in_adapted_layers_mb"]
        cols = ["method", "trainable_params", "step_time_s_median", "peak_mem_mb", "saved_activation_mb"]
        print("Cost (SmolLM2-135M, 4x64 tokens, 1 thread)\n" + markdown_table(cost, [*cols, "saved_in_layers_mb"]))
    print_targets(met, path)
    return path
