"""Reading run folders back: the final-metrics table (``leantrain report``) and curves (``leantrain plot``)."""

from __future__ import annotations

import json
from pathlib import Path

from leantrain.errors import LeantrainError
from leantrain.train.metric_loggers import read_jsonl


def load_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise LeantrainError(f"{run_dir} is not a finished run folder (no summary.json)")
    return json.loads(path.read_text())


def report_rows(run_dirs: list[Path]) -> list[dict]:
    """One flat row per run: name, status, steps, times, params and every final metric."""
    rows = []
    for run_dir in run_dirs:
        s = load_summary(run_dir)
        row = {"run": Path(run_dir).name, "status": s.get("status"), "steps": s.get("steps")}
        row["trainable_params"] = s.get("trainable_params")
        row["train_time_s"] = s.get("train_time_s")
        row["wall_time_s"] = s.get("wall_time_s")
        row.update(s.get("final", {}))
        rows.append(row)
    return rows


def print_report(run_dirs: list[Path]) -> None:
    """Print the rows as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    rows = report_rows(run_dirs)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    table = Table(*columns)
    for line in cells:
        table.add_row(*line)
    # Wide enough that no cell wraps, whatever the terminal (a table is read whole or piped to a file).
    width = sum(max(len(c), *(len(line[i]) for line in cells)) + 3 for i, c in enumerate(columns)) + 1
    Console(width=width).print(table)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def plot_runs(run_dirs: list[Path], metric: str, out: Path, split: str = "val", x: str = "step") -> Path:
    """Draw ``metric`` of ``split`` records against ``x`` for each run into a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.jsonl"
        if not path.is_file():
            raise LeantrainError(f"{run_dir} has no metrics.jsonl")
        points = [(r[x], r[metric]) for r in read_jsonl(path) if r.get("split") == split and metric in r]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=Path(run_dir).name)
            drawn += 1
    if not drawn:
        raise LeantrainError(f"no {split!r} records with metric {metric!r} in the given runs")
    ax.set_xlabel(x)
    ax.set_ylabel(f"{split} {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
