"""The benchmark JSON document and its Markdown table (shape in shared/BENCHMARKS.md)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

import leantrain

ROW_FIELDS = (
    "method", "anchor", "model", "task", "trainable_params", "metric_name", "metric", "seeds", "metric_std",
    "step_time_s_median", "peak_mem_mb", "saved_activation_mb",
)  # fmt: skip


def write_results(area: str, rows: list[dict], out_dir: Path, *, threads: int, quick: bool, extra: dict) -> Path:
    """Write ``out_dir/<area>.json`` and return its path."""
    doc = {
        "area": area,
        "leantrain_version": leantrain.__version__,
        "torch_version": torch.__version__,
        "threads": threads,
        "quick": quick,
        "rows": [{k: row.get(k) for k in ROW_FIELDS} | {"extra": row.get("extra", {})} for row in rows],
        **extra,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{area}.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def log(msg: str) -> None:
    """Progress of a benchmark, on stderr (stdout carries the tables)."""
    print(msg, file=sys.stderr, flush=True)


def print_targets(met: dict[str, bool | None], path: Path) -> None:
    """The issue's targets as evaluated on the measured rows, then where the JSON went."""
    print("\nTargets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in met.items()))
    print(f"wrote {path}")


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as an optimized PNG (parent folders created) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, pil_kwargs={"optimize": True})
    plt.close(fig)
    return path
