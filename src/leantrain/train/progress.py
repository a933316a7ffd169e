"""Progress display: a rich bar on a terminal, plain log lines otherwise (CI, pipes, files)."""

from __future__ import annotations

import sys
from typing import TextIO


def _fmt(metrics: dict) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return "  ".join(parts)


class PlainProgress:
    """One line per logged step, e.g. ``step 40/200  epoch 1  loss 0.52  accuracy 0.81``."""

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total = total
        self.stream = stream or sys.stderr

    def update(self, step: int, metrics: dict) -> None:
        print(f"step {step}/{self.total}  {_fmt(metrics)}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """A rich progress bar whose description shows the latest metrics."""

    def __init__(self, total: int, completed: int = 0):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self._progress = Progress(*columns, TextColumn("{task.description}"), console=Console(stderr=True))
        self._progress.start()
        self._task = self._progress.add_task("", total=total, completed=completed)

    def update(self, step: int, metrics: dict) -> None:
        self._progress.update(self._task, completed=step, description=_fmt(metrics))

    def message(self, text: str) -> None:
        self._progress.console.print(text)

    def close(self) -> None:
        self._progress.stop()


class NoProgress:
    def update(self, step: int, metrics: dict) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(mode: str, total: int, completed: int = 0):
    """``auto`` picks a bar when stderr is a terminal, plain lines otherwise."""
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "plain"
    if mode == "bar":
        return BarProgress(total, completed)
    if mode == "plain":
        return PlainProgress(total)
    return NoProgress()
