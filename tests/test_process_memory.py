"""peak_rss_mb reports a fresh process's own peak, not the peak of the large parent that started it (which
getrusage's ru_maxrss carries across exec on Linux)."""

import subprocess
import sys

import pytest

CHILD = ("import resource; from leantrain.process_memory import peak_rss_mb; "
         "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")  # fmt: skip


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and the inherited ru_maxrss are Linux's")
def test_a_child_of_a_large_parent_reports_its_own_peak():
    ballast = bytearray(600 * 2**20)  # the parent's resident memory: 600 MiB touched
    ballast[::4096] = b"x" * len(ballast[::4096])
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.split()
    own, inherited = float(out[0]), float(out[1])
    assert inherited > 600  # what ru_maxrss says: the parent's peak
    assert own < 300, own  # the child's own: an interpreter and one small module
    del ballast
