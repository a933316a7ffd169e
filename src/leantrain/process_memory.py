"""The peak resident memory of this process, measured so that a fresh process reports its own peak only.

``getrusage(RUSAGE_SELF).ru_maxrss`` is not that on Linux: ``exec`` keeps the larger of the old and the new memory
map's high-water mark, so a process started by a large parent (a benchmark driver that ran Flower, a test suite)
reports the parent's peak when its own is smaller (measured: 1,835 MB reported by a 800 MB simulator process whose
parent held 1.8 GB). ``VmHWM`` in ``/proc/self/status`` belongs to the current memory map and starts afresh at exec.
"""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Peak resident set size of this process (since its exec) in MiB: ``VmHWM`` on Linux, else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere
