"""``leantrain bench finetune``: GEM and PaCA against LoRA and full fine-tuning.

Two parts, both run by this command and written to ``bench-results/finetune.json``:

- **Accuracy** (:mod:`leantrain.bench.finetune_accuracy`): MiniLM on tweet sentiment, every method through its
  shipped recipe (same data, steps and schedule) at its own learning rate, chosen from a grid on the validation
  split with seed 0, then 3 seeds at that rate. Full fine-tuning, LoRA (r=8 on query/value), PaCA with its rank
  matched to LoRA's parameter count (r=16: 16x384 = 8x(384+384) per layer), GEM at 0.1% of all weights and at
  LoRA's count, GEM's official ablations and our variant.
- **Cost** (:mod:`leantrain.bench.finetune_cost`): SmolLM2-135M causal LM, 1 thread, PaCA's regime: all seven
  projections of every block, batch 1 x 512 tokens, LoRA r=27 vs PaCA r=53 (equal trainable counts, 8,242,560),
  plus full fine-tuning; and the cheaper q/v, 4 x 64 setting (LoRA r=8 vs PaCA r=20). Each method runs in a fresh
  process, processes interleaved over repeats. ``--part profile`` adds a torch.profiler step to each method's last
  process and prints its top operators by time and memory.

Targets from the issue are evaluated and printed, never tuned for.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from leantrain.bench import finetune_cost
from leantrain.bench.finetune_accuracy import accuracy_rows, accuracy_targets, summary_table
from leantrain.bench.finetune_cost import (
    COST_METHODS,
    COST_SETTINGS,
    FULL_PLAN,
    QUICK_PLAN,
    CostPlan,
    cost_report,
    cost_row,
    cost_targets,
)
from leantrain.bench.finetune_gem_scoring import scoring_rows, scoring_table
from leantrain.bench.report import BenchResults, Progress, discard, log, markdown_table, print_targets
from leantrain.errors import LeantrainError

PROFILE_ROWS = 15  # operators listed per method by --part profile


def cost_rows(quick: bool, log, add=discard, profile: bool = False) -> list[dict]:
    """Per setting, one row per method; each method in a fresh process per repeat (interleaved)."""
    plan = QUICK_PLAN if quick else FULL_PLAN
    rows = []
    for name in plan.settings:
        setting = COST_SETTINGS[name]
        samples: dict[str, list[dict]] = {m: [] for m in COST_METHODS}
        progress = Progress(f"finetune cost {name}", plan.repeats * len(COST_METHODS))
        for rep in range(plan.repeats):
            last = rep == plan.repeats - 1
            for method in COST_METHODS:  # interleaved: lora, paca, full, lora, paca, full, ...
                with progress.unit(f"{method} repeat {rep}"):
                    samples[method].append(_cost_sample(name, method, plan, profile and last))
                    median = statistics.median(samples[method][-1]["step_times_s"])
                    log(f"  {method:<5} repeat {rep}: median step {median:.3f} s")
                if last:
                    rows.append(cost_row(setting, method, samples[method]))
                    add(rows[-1])
    return rows


def _cost_sample(setting: str, method: str, plan: CostPlan, profile: bool) -> dict:
    cmd = [sys.executable, "-m", "leantrain.bench.finetune_cost", "--setting", setting, "--method", method,
           "--steps", str(plan.steps), "--warmup", str(plan.warmup), "--model", finetune_cost.COST_MODEL,
           *(["--seq-len", str(plan.seq_len)] if plan.seq_len else []),
           *(["--profile", str(PROFILE_ROWS)] if profile else [])]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LeantrainError(f"cost worker for {method} ({setting}) failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def targets(acc: list[dict], cost: list[dict]) -> dict[str, bool | None]:
    """The issue's targets, evaluated on the measured rows."""
    out: dict[str, bool | None] = dict(cost_targets(cost))
    out.update(accuracy_targets(summary_table(acc)) if acc else {})
    return out


def run_bench(
    quick: bool, out_dir: Path, seeds: int | None = None, parts: tuple[str, ...] = ("scoring", "accuracy", "cost")
) -> Path:
    started = time.perf_counter()
    results = BenchResults("finetune", out_dir, threads=1, quick=quick)
    acc, cost = [], []
    scoring = []
    if "scoring" in parts:
        log("scoring: what each GEM rule picks (MiniLM, tweets, 0.1%)")
        scoring = scoring_rows(quick, log=log, add=results.add)
    if "accuracy" in parts:
        log("accuracy: MiniLM on tweets, each method at its learning rate chosen on validation (2 workers)")
        acc = accuracy_rows(quick, workers=2, log=log, add=results.add, set_extra=results.set_extra)
    if "cost" in parts:
        log("cost: SmolLM2-135M, 1 thread, fresh process per method (settings: see leantrain.bench.finetune_cost)")
        cost = cost_rows(quick, log=log, add=results.add, profile="profile" in parts)
    met = targets(acc, cost)
    extra = {"targets": met, "wall_time_s": round(time.perf_counter() - started, 1), "accuracy_threads": 1,
             "accuracy_workers": 2}  # fmt: skip
    path = results.finish(extra)
    if scoring:
        cols = ["rule", "picks", "smallest_decile_share", "median_abs_w_picks", "median_abs_w_all",
                "grad_mass_captured", "grad_mass_best_same_counts"]  # fmt: skip
        print("GEM scoring (MiniLM query/value, 0.1%)\n" + markdown_table(scoring_table(scoring), cols) + "\n")
    if acc:
        cols = ["method", "lr", "trainable_params", "trainable_pct", "val_accuracy", "test_accuracy", "std", "seeds",
                "step_time_s_median"]  # fmt: skip
        table = summary_table(acc)
        print("Accuracy (MiniLM, tweets; each method at its lr chosen on validation; test accuracy mean and std over "
              "seeds)\n" + markdown_table(table, cols) + "\n")  # fmt: skip
        grid = results.extra.get("lr_grid", [])
        grid_table = markdown_table(grid, ["method", "lr", "val_accuracy"])
        print(f"Learning-rate grid (seed 0, validation accuracy)\n{grid_table}\n")
    if cost:
        print(cost_report(cost) + "\n")
    print_targets(met, path)
    return path
