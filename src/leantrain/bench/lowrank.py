"""``leantrain bench lowrank``: DRA against fixed low-rank and full-rank training on ResNet-20 / Fashion-MNIST.

Every arm is the shipped ``dra-resnet20-fashion-mnist`` recipe with one override (``lowrank.training=full``,
``fixed``, or DRA itself; part ``deflate-svd`` adds DRA with ``lowrank.deflate=svd``), on a fixed 10k-image
training subset for 12 epochs (the recipe's 15 epochs on 60k images take about 2.5 CPU-hours per run here),
full 10k test set, 1 thread, seeds interleaved. The learning-rate decays (100/150 and 130/150 of the run) and
DRA's switches (55/150 and 120/150) are the official schedule scaled to 12 epochs: decays at 8 and 10, switches at
4 and 10. Per arm:

- test accuracy (mean ± std over seeds);
- training FLOPs counted analytically (:func:`leantrain.lowrank.training_macs`: forward, input-gradient and
  weight-gradient MACs of every conv / linear call, × 2), per phase and over the run, and their ratio to full rank;
- median step time per phase, from the loop's logged windows (5 steps each, evaluation excluded);
- effective rank of the 18 target convolutions at every epoch (mean over layers), plotted to
  ``<out>/lowrank-effective-rank.png``.

Targets from the issue are evaluated and printed, never tuned for.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from leantrain.bench.report import (
    BenchResults,
    Progress,
    discard,
    log,
    markdown_table,
    mean_std,
    print_targets,
    save_figure,
)
from leantrain.errors import ConfigError

RECIPE = "dra-resnet20-fashion-mnist"
ARMS = {
    "full": ["lowrank.training=full"],
    "lowrank": ["lowrank.training=fixed"],
    "dra": [],
    "dra-svd": ["lowrank.deflate=svd"],
}
PARTS = {"accuracy": ("full", "lowrank", "dra"), "deflate-svd": ("dra-svd",)}
STANDARD = ["data.train_subset=10000", "train.epochs=12", "train.decay_epochs=[8,10]", "train.log_every=5"]
QUICK = ["data.train_subset=1500", "data.eval_subset=1000", "train.epochs=3", "train.decay_epochs=[2]",
         "train.log_every=2"]  # fmt: skip


def _phases(cfg) -> list[str]:
    """The phase of every epoch of ``cfg``'s run."""
    from leantrain.lowrank import DynamicRankSchedule
    from leantrain.lowrank.recipe import schedule_events

    epochs = cfg.train.epochs
    if cfg.lowrank.training != "dynamic":
        return ["lowrank" if cfg.lowrank.training == "fixed" else "full"] * epochs
    schedule = DynamicRankSchedule(schedule_events(cfg.lowrank, epochs))
    return [schedule.phase_at(e) for e in range(epochs)]


def phase_macs(cfg, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Training MACs per sample of each phase of ``cfg`` (its model, target layers and rank ratio)."""
    from leantrain.lowrank import DynamicRankSchedule, training_macs
    from leantrain.lowrank.recipe import layer_patterns
    from leantrain.models import build_model

    example = torch.zeros(2, *input_shape)
    out = {}
    for phase in dict.fromkeys(_phases(cfg)):
        model = build_model(cfg.model.name, **cfg.model.options)
        lr = cfg.lowrank
        DynamicRankSchedule([(0, phase)], rank_ratio=lr.rank_ratio, layers=layer_patterns(lr.target_layers),
                            alpha=lr.adapter_alpha).apply(model, 0)  # fmt: skip
        out[phase] = training_macs(model, example).total
    return out


def _records(run_dir: Path, split: str) -> list[dict]:
    from leantrain.train.metric_loggers import read_jsonl

    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == split]


def _phase_step_times(run_dir: Path, phases: list[str], batch: int) -> dict[str, float]:
    """Median seconds per step of each phase from the logged training windows (samples/s over 5 steps)."""
    times: dict[str, list[float]] = {}
    for r in _records(run_dir, "train"):
        if r.get("samples_per_s") and r["epoch"] < len(phases):
            times.setdefault(phases[r["epoch"]], []).append(batch / r["samples_per_s"])
    return {phase: statistics.median(v) for phase, v in times.items()}


def run_arm(arm: str, seed: int, quick: bool, tmp: str) -> dict:
    from leantrain.config import resolve
    from leantrain.runs.launch import run

    overrides = [*(QUICK if quick else STANDARD), *ARMS[arm], f"seed={seed}", "threads=1", "progress=none",
                 f"output_dir={tmp}"]  # fmt: skip
    cfg = resolve(RECIPE, overrides)
    summary = run(cfg).summary
    run_dir = Path(summary["run_dir"])
    phases = _phases(cfg)
    samples = sum(len(b["labels"]) for b in _train_batches(cfg))
    macs = phase_macs(cfg, (1, 28, 28))
    ranks = _records(run_dir, "rank")
    return {
        "accuracy": summary["final"]["test_accuracy"],
        "train_time_s": summary["train_time_s"],
        "phases": phases,
        "phase_macs": macs,
        "train_flops": 2 * samples * sum(macs[p] for p in phases),
        "phase_step_s": _phase_step_times(run_dir, phases, cfg.data.batch_size),
        "erank": [r["erank_mean"] for r in ranks],  # at train begin, then after every epoch
        "trainable_params": summary["trainable_params"],
    }


def _train_batches(cfg):
    from leantrain.runs.supervised import prepare_data

    return prepare_data(cfg).train


def arm_rows(arms: tuple[str, ...], seeds: int, quick: bool, log, add=discard) -> list[dict]:
    """One row per arm over ``seeds`` seeds (interleaved), passed to ``add`` when its last seed finishes.

    ``full`` runs first (ARMS order), so every later row's ratios to it are known when the row is finished.
    """
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    progress = Progress("lowrank", seeds * len(arms))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            for arm in arms:
                with progress.unit(f"{arm} seed {seed}"):
                    res = run_arm(arm, seed, quick, tmp)
                    results[arm].append(res)
                    steps = ", ".join(f"{p} {s:.3f} s" for p, s in res["phase_step_s"].items())
                    log(f"  {arm:<8} seed {seed}: test accuracy {res['accuracy']:.4f}, "
                        f"train {res['train_time_s']:.0f} s (step: {steps}), "
                        f"erank {res['erank'][0]:.2f} -> {res['erank'][-1]:.2f}")  # fmt: skip
                if seed == seeds - 1:
                    full = next((r for r in rows if r["method"] == "full"), None)
                    rows.append(_arm_row(arm, results[arm], full))
                    add(rows[-1])
    return rows


def _arm_row(arm: str, runs: list[dict], full: dict | None) -> dict:
    """The row of one arm; ``full`` is the full-rank row when it was measured (None for ``full`` itself)."""
    mean, std = mean_std([r["accuracy"] for r in runs])
    phases = sorted({p for r in runs for p in r["phase_step_s"]})
    ex = {
        "per_seed": [r["accuracy"] for r in runs], "train_flops": runs[0]["train_flops"],
        "phases": runs[0]["phases"], "phase_macs_per_sample": runs[0]["phase_macs"],
        "phase_step_s_median": {p: statistics.median(r["phase_step_s"][p] for r in runs if p in r["phase_step_s"])
                                for p in phases},
        "train_time_s_median": statistics.median(r["train_time_s"] for r in runs),
        "erank_mean_per_epoch": [statistics.fmean(v) for v in zip(*(r["erank"] for r in runs), strict=True)],
    }  # fmt: skip
    anchor = ex if arm == "full" else (full or {}).get("extra")
    if anchor:
        ex["flops_ratio_to_full"] = ex["train_flops"] / anchor["train_flops"]
        ex["time_ratio_to_full"] = ex["train_time_s_median"] / anchor["train_time_s_median"]
    return {
        "method": arm, "anchor": arm == "full", "model": "resnet20", "task": "fashion-mnist",
        "trainable_params": runs[0]["trainable_params"], "metric_name": "accuracy", "metric": mean,
        "seeds": len(runs), "metric_std": std,
        "step_time_s_median": statistics.median(s for r in runs for s in r["phase_step_s"].values()), "extra": ex,
    }  # fmt: skip


def plot_effective_rank(rows: list[dict], path: Path) -> Path:
    """Mean effective rank of the target layers against epochs, one line per arm, DRA's switches marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 3.8), dpi=80)
    for row in rows:
        curve = row["extra"]["erank_mean_per_epoch"]
        ax.plot(range(len(curve)), curve, marker="o", ms=3, label=row["method"])
    dra = next((r for r in rows if r["method"].startswith("dra")), None)
    if dra:
        phases = dra["extra"]["phases"]
        for epoch in range(1, len(phases)):
            if phases[epoch] != phases[epoch - 1]:
                ax.axvline(epoch, color="grey", ls=":", lw=1)
                ax.text(epoch + 0.1, ax.get_ylim()[0], f"DRA: {phases[epoch]}", fontsize=7, va="bottom")
    ax.set(xlabel="epoch", ylabel="effective rank (mean over the 18 block convs)")
    ax.set_title("ResNet-20 / Fashion-MNIST: effective rank of the target layers (mean over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def targets(rows: list[dict]) -> dict[str, bool]:
    r = {row["method"]: row for row in rows}
    out: dict[str, bool] = {}
    if {"full", "dra"} <= set(r):
        out["dra_within_1pt_of_full"] = r["dra"]["metric"] >= r["full"]["metric"] - 0.01
        out["dra_flops<=0.7x_full"] = r["dra"]["extra"]["flops_ratio_to_full"] <= 0.7
    if {"lowrank", "dra"} <= set(r):
        out["dra_above_fixed_lowrank"] = r["dra"]["metric"] > r["lowrank"]["metric"]
    return out


def run_bench(quick: bool, out_dir: Path, seeds: int | None = None, parts: tuple[str, ...] = ("accuracy",)) -> Path:
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ConfigError(f"bench lowrank: unknown part(s) {unknown}; choose from {list(PARTS)}")
    started = time.perf_counter()
    results = BenchResults("lowrank", out_dir, threads=1, quick=quick)
    arms = tuple(arm for part in PARTS if part in parts for arm in PARTS[part])
    log(f"low-rank training: ResNet-20 on Fashion-MNIST, arms {', '.join(arms)}, 1 thread")
    rows = arm_rows(arms, seeds or (1 if quick else 3), quick, log, add=results.add)
    met = targets(rows)
    png = plot_effective_rank(rows, out_dir / "lowrank-effective-rank.png")
    path = results.finish({"targets": met, "wall_time_s": round(time.perf_counter() - started, 1), "plot": str(png)})
    for row in rows:
        ex = row["extra"]
        steps = {f"step_s_{p}": ex["phase_step_s_median"].get(p) for p in ("lowrank", "full", "adapter")}
        row.update(flops_ratio=ex.get("flops_ratio_to_full"), train_pflops=ex["train_flops"] / 1e15,
                   time_ratio=ex.get("time_ratio_to_full"), erank_end=ex["erank_mean_per_epoch"][-1])  # fmt: skip
        row.update(steps)
    cols = ["method", "metric", "metric_std", "seeds", "train_pflops", "flops_ratio", "time_ratio",
            "step_s_lowrank", "step_s_full", "step_s_adapter", "erank_end"]  # fmt: skip
    print("DRA vs fixed low-rank vs full rank (ResNet-20, Fashion-MNIST)\n" + markdown_table(rows, cols))
    print(f"effective-rank plot: {png}")
    print_targets(met, path)
    return path
