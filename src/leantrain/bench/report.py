"""The benchmark JSON document, written row by row (shape in shared/BENCHMARKS.md), its Markdown table, progress."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import leantrain

ROW_FIELDS = (
    "method", "anchor", "model", "task", "trainable_params", "metric_name", "metric", "seeds", "metric_std",
    "step_time_s_median", "peak_mem_mb", "saved_activation_mb",
)  # fmt: skip
# Optional top-level fields an area's rows may add (shared/BENCHMARKS.md); written only where a row has them.
OPTIONAL_ROW_FIELDS = ("bytes_up", "bytes_down", "messages_up", "rounds", "env_steps", "clients_per_s", "rounds_per_s")


class BenchResults:
    """``out_dir/<area>.json``, rewritten after every finished row so an interrupted benchmark keeps its rows.

    The document has the shape of shared/BENCHMARKS.md plus ``"complete"``: false until :meth:`finish` adds the
    fields only known at the end (targets, wall time, ...) and sets it true. Every write goes to a temporary file in
    the same folder that then replaces the document (``os.replace``), so a reader never sees a torn file. Rows are
    kept by reference and projected onto ``ROW_FIELDS`` + ``extra`` at every write: a change a part makes to a row's
    ``extra`` after adding it (a ratio to an anchor measured later) lands in the next write.
    """

    def __init__(self, area: str, out_dir: Path, *, threads: int, quick: bool):
        self.area, self.threads, self.quick = area, threads, quick
        self.path = Path(out_dir) / f"{area}.json"
        self.rows: list[dict] = []
        self.complete = False
        self.extra: dict = {}

    def add(self, row: dict) -> None:
        """One finished row; the document is rewritten with it."""
        self.rows.append(row)
        self._write()

    def add_rows(self, rows: list[dict]) -> None:
        """Several rows finished together (one rewrite)."""
        self.rows += rows
        self._write()

    def set_extra(self, key: str, value) -> None:
        """A top-level field that grows while the benchmark runs (e.g. a learning-rate grid); rewritten now."""
        self.extra[key] = value
        self._write()

    def finish(self, extra: dict) -> Path:
        """Write the complete document with ``extra``'s top-level fields and return its path."""
        self.extra, self.complete = {**self.extra, **extra}, True
        self._write()
        return self.path

    def document(self) -> dict:
        return {
            "area": self.area,
            "leantrain_version": leantrain.__version__,
            "torch_version": torch.__version__,
            "threads": self.threads,
            "quick": self.quick,
            "complete": self.complete,
            "rows": [
                {k: row.get(k) for k in ROW_FIELDS}
                | {k: row[k] for k in OPTIONAL_ROW_FIELDS if k in row}
                | {"extra": row.get("extra", {})}
                for row in self.rows
            ],
            **self.extra,
        }

    def _write(self) -> None:
        text = json.dumps(self.document(), indent=1)  # before touching the disk: an unserializable row fails here
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def discard(row: dict) -> None:
    """The ``add`` of a part function called on its own, without a :class:`BenchResults`."""


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
    """Progress of a benchmark, on stderr (stdout carries the tables).

    One write per line, so lines from parallel workers (threads or processes) do not interleave mid-line.
    """
    sys.stderr.write(f"{msg}\n")
    sys.stderr.flush()


@contextmanager
def progress(what: str, index: int, total: int | None = None) -> Iterator[None]:
    """``[3/12] <what>`` on stderr before one unit of a benchmark part, ``[3/12] ... done in 41.2 s`` after it.

    ``total`` is the number of units of the part when it is known up front (``[3]`` otherwise).
    """
    tag = f"[{index}/{total}]" if total else f"[{index}]"
    log(f"{tag} {what}")
    start = time.perf_counter()
    yield
    log(f"{tag} ... done in {time.perf_counter() - start:.1f} s")


class Progress:
    """Numbers the units of one benchmark part for :func:`progress`: ``Progress("optim accuracy", 12)``."""

    def __init__(self, label: str, total: int | None = None):
        self.label, self.total = label, total
        self._count = itertools.count(1)  # next() on it is atomic: parts that run units on threads share one

    def unit(self, what: str):
        """Context manager around one unit (``with units.unit(f"{name} seed {seed}"):``)."""
        return progress(f"{self.label}: {what}", next(self._count), self.total)


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
