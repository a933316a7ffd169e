"""Crash reports: the full traceback of an unexpected error, written to a file the one-line message points to.

Inside a run the report is ``<run folder>/error.log``; elsewhere ``~/.cache/leantrain/crashes/`` (see
:func:`leantrain.cache.cache_dir`). An exception may carry ``details`` (e.g. a worker process's own traceback),
appended to the report.
"""

from __future__ import annotations

import os
import traceback
from datetime import datetime
from pathlib import Path

REPORT_ATTR = "crash_report"  # the path of the report already written for an exception


def write_crash_report(err: BaseException, folder: Path | None = None) -> Path:
    """Write ``err``'s traceback (and its ``details``) to ``folder/error.log`` or a new file in the cache."""
    from leantrain.cache import cache_dir

    text = "".join(traceback.format_exception(err))
    details = getattr(err, "details", None)
    if details:
        text += f"\n--- details ---\n{details}\n"
    if folder is not None:
        path = Path(folder) / "error.log"
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = cache_dir("crashes") / f"crash-{stamp}-{os.getpid()}.log"
    path.write_text(text)
    setattr(err, REPORT_ATTR, path)
    return path


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (a message that is itself a traceback keeps only its last line)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.startswith("Traceback"):
        text = lines[-1]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
