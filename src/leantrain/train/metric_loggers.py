"""Metric loggers: a tiny protocol (``log``, ``close``) with JSON-lines, CSV and TensorBoard behind it.

Every record is a flat dict such as ``{"split": "train", "step": 120, "epoch": 1, "loss": 0.41,
"accuracy": 0.88, "lr": 0.001, "samples_per_s": 812.0, "elapsed_s": 14.2}``. Its x axis depends on the run
kind: ``step`` (supervised), ``round`` (federated) or ``t_env`` (multi-agent RL).

``metrics.jsonl`` is always written and is the source of truth (reports and benchmarks read it); CSV files and
TensorBoard events are optional views of the same records, chosen with ``open_metric_loggers(..., formats)``.
A resumed run forgets everything past its checkpoint in all three, so each reads like one clean run.
"""

from __future__ import annotations

import csv
import json
import numbers
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, TextIO

from leantrain.errors import ConfigError, MissingDependencyError

LOG_FORMATS = ("jsonl", "csv", "tensorboard")
# Fields that place a record rather than measure something; never plotted as TensorBoard scalars.
_BOOKKEEPING = ("split", "epoch")


class MetricLogger(Protocol):
    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------- JSON lines


class JsonlLogger:
    """Appends one JSON object per line; flushes every record so a crash loses nothing written.

    ``drop_after``: a resumed run first drops records whose ``x_key`` is past its checkpoint (records
    without that key, such as a final summary, are kept).
    """

    def __init__(
        self,
        path: Path,
        *,
        x_key: str = "step",
        drop_after: float | None = None,
    ):
        path = Path(path)
        if drop_after is not None and path.exists():
            kept = [r for r in _parsed_lines(path) if r.get(x_key) is None or r[x_key] <= drop_after]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.path, self.x_key = path, x_key
        torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._file = path.open("a")
        if torn:  # end a line torn by a crash, or the next record would be glued to it and lost too
            self._file.write("\n")

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
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # only the last line can be torn: the process died while writing it
    return records


# ----------------------------------------------------------------------------- CSV


def csv_name(split: str | None) -> str:
    """``metrics-<split>.csv`` for records of one split, ``metrics.csv`` for records without one."""
    if split is None:
        return "metrics.csv"
    return f"metrics-{re.sub(r'[^A-Za-z0-9_.-]', '_', str(split))}.csv"


class CsvLogger:
    """One CSV file per split in ``directory``, since train and val records carry different keys.

    The header holds every key seen so far for that split, in order of first appearance; a record with a new
    key rewrites that file with the longer header (earlier rows get empty cells), so no value is lost.
    ``records`` (e.g. the kept lines of metrics.jsonl on resume) are written first, replacing any CSV files
    already there, so the CSV files always hold exactly what metrics.jsonl holds.
    """

    def __init__(self, directory: Path, records: Iterable[dict] = ()):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in [*self.directory.glob("metrics.csv"), *self.directory.glob("metrics-*.csv")]:
            stale.unlink()
        self._fields: dict[str, list[str]] = {}  # file name -> header
        self._files: dict[str, TextIO] = {}  # file name -> open text file (append)
        self._write_all(records)

    def log(self, record: dict) -> None:
        name = csv_name(record.get("split"))
        fields = self._fields.get(name)
        if fields is None:
            self._rewrite(name, list(record), [])
        elif any(k not in fields for k in record):
            self._rewrite(name, fields + [k for k in record if k not in fields], self._rows(name))
        writer = csv.DictWriter(self._files[name], fieldnames=self._fields[name], restval="")
        writer.writerow(record)
        self._files[name].flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _write_all(self, records: Iterable[dict]) -> None:
        # One pass per file instead of a rewrite per new key; same content as logging them one by one.
        grouped: dict[str, list[dict]] = {}
        for r in records:
            grouped.setdefault(csv_name(r.get("split")), []).append(r)
        for name, rows in grouped.items():
            self._rewrite(name, list(dict.fromkeys(k for r in rows for k in r)), rows)

    def _rows(self, name: str) -> list[dict]:
        self._files[name].close()
        with (self.directory / name).open(newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self, name: str, fields: list[str], rows: list[dict]) -> None:
        if name in self._files:
            self._files[name].close()
        path = self.directory / name
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)  # a crash mid-rewrite leaves the old file, not half a new one
        self._fields[name] = fields
        self._files[name] = path.open("a", newline="")


# ----------------------------------------------------------------------------- TensorBoard


class TensorBoardLogger:
    """Every numeric field of a record becomes the scalar ``<split>/<name>`` at ``global_step = record[x_key]``.

    ``x_key`` and bookkeeping fields (split, epoch) are not plotted; records without ``x_key`` are skipped.
    ``purge_step``: on resume, TensorBoard hides events of earlier sessions at or past this step.
    """

    def __init__(self, log_dir: Path, x_key: str = "step", *, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise MissingDependencyError(
                "tensorboard", 'pip install -c constraints.txt "leantrain[tensorboard]"'
            ) from e
        self.log_dir, self.x_key = Path(log_dir), x_key
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        self._writer.flush()  # the purge marker reaches disk now, not at the first record

    def log(self, record: dict) -> None:
        x = record.get(self.x_key)
        if x is None:
            return
        split = record.get("split")
        for name, value in record.items():
            if name == self.x_key or name in _BOOKKEEPING or not _is_number(value):
                continue
            tag = f"{split}/{name}" if split is not None else name
            self._writer.add_scalar(tag, float(value), global_step=int(x))
        self._writer.flush()  # like metrics.jsonl: a crash loses nothing already logged

    def close(self) -> None:
        self._writer.close()


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- fan-out


class MetricLoggers:
    """Sends each record to several loggers; closes all of them even if one fails."""

    def __init__(self, loggers: Sequence[MetricLogger]):
        self.loggers = list(loggers)

    def log(self, record: dict) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        errors = []
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as e:  # close the rest, then re-raise the first
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> MetricLoggers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_metric_loggers(
    run_dir: Path, formats: Sequence[str] = ("jsonl",), x_key: str = "step", resume_after: float | None = None
) -> MetricLoggers:
    """Loggers for a run folder: ``metrics.jsonl`` always, plus ``metrics-<split>.csv`` and ``tensorboard/``.

    ``resume_after``: the x value (step, round or t_env) of the checkpoint a run resumes from; records past it
    are dropped from metrics.jsonl, the CSV files are rebuilt from what is kept, and TensorBoard purges them.
    """
    unknown = [f for f in formats if f not in LOG_FORMATS]
    if unknown:
        raise ConfigError(f"unknown metric log format(s) {unknown}; choose from {list(LOG_FORMATS)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    loggers: list[MetricLogger] = []
    try:
        # TensorBoard first: a missing package is reported before any metrics file is touched.
        if "tensorboard" in formats:
            purge = None if resume_after is None else int(resume_after) + 1
            loggers.append(TensorBoardLogger(run_dir / "tensorboard", x_key, purge_step=purge))
        jsonl = JsonlLogger(run_dir / "metrics.jsonl", x_key=x_key, drop_after=resume_after)
        loggers.insert(0, jsonl)
        if "csv" in formats:
            loggers.append(CsvLogger(run_dir, read_jsonl(jsonl.path)))
    except BaseException:
        MetricLoggers(loggers).close()
        raise
    return MetricLoggers(loggers)
