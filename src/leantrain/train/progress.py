"""Progress display for every run kind: a rich bar on a terminal, plain log lines otherwise (CI, pipes, files).

All of it goes to stderr (stdout carries results). A run announces itself with one start line (run folder, budget,
device, threads), the bar then moves on every step (``advance``), metrics refresh at each logged step
(``update``; plain mode prints one line there) and ``message`` prints a line above the bar (evaluations, the final
evaluation). Supervised runs count optimizer steps, federated runs rounds, MARL runs environment steps.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO


def _fmt(metrics: dict) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return "  ".join(parts)


def start_text(run_dir: Path, budget: str, resumed_at: int | None = None) -> str:
    """``run runs/x-...: 600 steps (3 epochs of 200 batches), device cpu, 1 thread``."""
    import torch

    threads = torch.get_num_threads()
    text = f"run {run_dir}: {budget}, device cpu, {threads} thread{'s' if threads > 1 else ''}"
    return text + (f"; resuming after {resumed_at}" if resumed_at else "")


class PlainProgress:
    """One line per logged step, e.g. ``step 40/200  epoch 1  loss 0.52  accuracy 0.81``."""

    def __init__(self, total: int, unit: str = "step", stream: TextIO | None = None):
        self.total, self.unit = total, unit
        self.stream = stream or sys.stderr

    def advance(self, done: int) -> None:
        pass

    def update(self, done: int, metrics: dict) -> None:
        print(f"{self.unit} {done}/{self.total}  {_fmt(metrics)}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """A rich progress bar that moves every step; its description shows the latest logged metrics."""

    def __init__(self, total: int, completed: int = 0, unit: str = "step"):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn(f"[bold]{unit}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self._progress = Progress(*columns, TextColumn("{task.description}"), console=Console(stderr=True))
        self._progress.start()
        self._task = self._progress.add_task("", total=total, completed=completed)

    def advance(self, done: int) -> None:
        self._progress.update(self._task, completed=done)

    def update(self, done: int, metrics: dict) -> None:
        self._progress.update(self._task, completed=done, description=_fmt(metrics))

    def message(self, text: str) -> None:
        self._progress.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self._progress.stop()


class NoProgress:
    def advance(self, done: int) -> None:
        pass

    def update(self, done: int, metrics: dict) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(mode: str, total: int, completed: int = 0, unit: str = "step", start: str | None = None):
    """``auto`` picks a bar when stderr is a terminal, plain lines otherwise; ``start`` is printed first."""
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "plain"
    if mode == "none":
        return NoProgress()
    if start:
        print(start, file=sys.stderr, flush=True)
    return BarProgress(total, completed, unit) if mode == "bar" else PlainProgress(total, unit)
