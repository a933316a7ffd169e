"""``leantrain bench prune``: VAR against plain training and SAM, judged by one-shot magnitude pruning.

Each arm trains through a shipped recipe and is then pruned globally by magnitude at 50/70/90/95% (and 98%)
sparsity with no retraining (``prune.eval_sparsities``); the test accuracy of the dense and of every pruned
model is recorded. Arms: ``plain`` (``prune.var_lam=0``), ``var`` (the recipe's λ = 1e-5), ``sam`` (SAM,
rho 0.05, around the same SGD, no VAR). Parts (``--part``):

- ``mlp``: ``var-mlp-digits`` (MLP 64-256-256-10 on sklearn digits, 40 epochs), 5 seeds by default;
- ``resnet``: ``var-resnet20-fashion-mnist`` on a fixed 10k-image training subset for 8 epochs (the recipe's
  60k × 5 epochs is about 40 CPU-minutes per run here), full 10k test set, 3 seeds by default.

1 thread per run, seeds interleaved. Targets from the issue are evaluated and printed, never tuned for.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from leantrain.bench.report import BenchResults, Progress, discard, log, markdown_table, mean_std, print_targets
from leantrain.errors import ConfigError

SPARSITIES = (0.5, 0.7, 0.9, 0.95, 0.98)
ARMS = {
    "plain": ["prune.var_lam=0"],
    "var": [],
    "sam": ["prune.var_lam=0", "optim.name=sam", "optim.base=sgd", "optim.rho=0.05"],
}
PARTS = {
    "mlp": ("var-mlp-digits", [], ["train.epochs=5"], 5),
    "resnet": (
        "var-resnet20-fashion-mnist",
        ["data.train_subset=10000", "train.epochs=8", "train.warmup_steps=30"],
        ["data.train_subset=1500", "data.eval_subset=1000", "train.epochs=1", "train.warmup_steps=5"],
        3,
    ),
}


def run_arm(recipe: str, overrides: list[str], arm: str, seed: int, tmp: str) -> dict:
    from leantrain.config import resolve
    from leantrain.runs.launch import run

    sparsities = "[" + ",".join(f"{s:g}" for s in SPARSITIES) + "]"
    cfg = resolve(recipe, [*overrides, *ARMS[arm], f"prune.eval_sparsities={sparsities}", f"seed={seed}",
                           "threads=1", "progress=none", f"output_dir={tmp}"])  # fmt: skip
    summary = run(cfg).summary
    return {
        "dense": summary["final"]["test_accuracy"],
        "pruned": {float(s): m["test_accuracy"] for s, m in summary["pruned"].items()},
        "train_time_s": summary["train_time_s"],
        "trainable_params": summary["trainable_params"],
    }


def part_rows(part: str, seeds: int, quick: bool, log, add=discard) -> list[dict]:
    """One row per arm over ``seeds`` seeds (interleaved), passed to ``add`` when its last seed finishes."""
    recipe, standard, quick_overrides, _ = PARTS[part]
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    progress = Progress(f"prune {part}", seeds * len(ARMS))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            for arm in ARMS:
                with progress.unit(f"{arm} seed {seed}"):
                    res = run_arm(recipe, quick_overrides if quick else standard, arm, seed, tmp)
                    results[arm].append(res)
                    pruned = ", ".join(f"{s:g}: {a:.3f}" for s, a in res["pruned"].items())
                    log(f"  {part} {arm:<5} seed {seed}: dense {res['dense']:.4f}; pruned {pruned}; "
                        f"train {res['train_time_s']:.0f} s")  # fmt: skip
                if seed == seeds - 1:
                    rows.append(_arm_row(part, arm, results[arm]))
                    add(rows[-1])
    return rows


def _arm_row(part: str, arm: str, runs: list[dict]) -> dict:
    mean, std = mean_std([r["dense"] for r in runs])
    pruned = {}
    for s in SPARSITIES:
        m, sd = mean_std([r["pruned"][s] for r in runs])
        pruned[f"{s:g}"] = {"mean": m, "std": sd, "per_seed": [r["pruned"][s] for r in runs]}
    return {
        "method": f"{part}-{arm}", "anchor": arm == "plain", "model": "mlp-256-256" if part == "mlp" else "resnet20",
        "task": "digits" if part == "mlp" else "fashion-mnist",
        "trainable_params": runs[0]["trainable_params"], "metric_name": "accuracy (dense)", "metric": mean,
        "seeds": len(runs), "metric_std": std,
        "extra": {"per_seed_dense": [r["dense"] for r in runs], "pruned": pruned,
                  "train_time_s_median": statistics.median(r["train_time_s"] for r in runs)},
    }  # fmt: skip


def targets(rows: list[dict]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    r = {row["method"]: row for row in rows}
    for part in PARTS:
        if f"{part}-var" in r and f"{part}-plain" in r:
            var, plain = r[f"{part}-var"], r[f"{part}-plain"]
            gain = var["extra"]["pruned"]["0.9"]["mean"] - plain["extra"]["pruned"]["0.9"]["mean"]
            out[f"{part}_var_at_90%>=plain+5pts"] = gain >= 0.05
            out[f"{part}_var_dense_within_1pt"] = abs(var["metric"] - plain["metric"]) <= 0.01
    return out


def run_bench(quick: bool, out_dir: Path, seeds: int | None = None, parts: tuple[str, ...] = tuple(PARTS)) -> Path:
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ConfigError(f"bench prune: unknown part(s) {unknown}; choose from {list(PARTS)}")
    started = time.perf_counter()
    area = "prune" if set(parts) == set(PARTS) else "prune-" + "-".join(p for p in PARTS if p in parts)
    results = BenchResults(area, out_dir, threads=1, quick=quick)
    rows = []
    for part in PARTS:
        if part in parts:
            log(f"{part}: {PARTS[part][0]}, arms {', '.join(ARMS)}, one-shot global magnitude pruning")
            rows += part_rows(part, seeds or (1 if quick else PARTS[part][3]), quick, log, add=results.add)
    met = targets(rows)
    path = results.finish(
        {"targets": met, "wall_time_s": round(time.perf_counter() - started, 1), "sparsities": SPARSITIES}
    )
    cols = ["method", "seeds", "dense"] + [f"{s:.0%}" for s in SPARSITIES]
    for row in rows:
        row["dense"] = f"{row['metric']:.4f} ± {row['metric_std']:.4f}"
        for s in SPARSITIES:
            p = row["extra"]["pruned"][f"{s:g}"]
            row[f"{s:.0%}"] = f"{p['mean']:.4f} ± {p['std']:.4f}"
    print("Test accuracy, dense and after one-shot global magnitude pruning (no retraining)\n"
          + markdown_table(rows, cols))  # fmt: skip
    print_targets(met, path)
    return path
