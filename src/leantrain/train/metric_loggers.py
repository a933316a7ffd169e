"""Metric loggers: a tiny protocol (``log``, ``close``) with JSON-lines and CSV files behind it.

Every record is a flat dict such as ``{"split": "train", "step": 120, "epoch": 1, "loss": 0.41,
"accuracy": 0.88, "lr": 0.001, "samples_per_s": 812.0, "elapsed_s": 14.2}``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Protocol


class MetricLogger(Protocol):
    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """Appends one JSON object per line; flushes every record so a crash loses nothing written."""

    def __init__(self, path: Path, *, drop_after_step: int | None = None):
        # A resumed run first forgets records past its checkpoint, so the log reads like one clean run.
        if drop_after_step is not None and path.exists():
            kept = [r for r in _parsed_lines(path) if r["step"] <= drop_after_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.path = path
        self._file = path.open("a")

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: Path) -> list[dict]:
    """All records of a metrics.jsonl file (a line torn by a crash mid-write is skipped)."""
    return _parsed_lines(path)


def _parsed_lines(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # only the last line can be torn: the process died while writing it
    return records


class CsvLogger:
    """Writes records as CSV rows; the header is the union of keys seen in the first record."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("w", newline="")
        self._writer: csv.DictWriter | None = None

    def log(self, record: dict) -> None:
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, fieldnames=list(record), extrasaction="ignore")
            self._writer.writeheader()
        self._writer.writerow(record)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
