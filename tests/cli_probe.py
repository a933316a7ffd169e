"""Run the ``leantrain`` command in a fresh interpreter and report which heavy packages it imported."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "sklearn")
# What the console script runs, plus a line at exit naming the heavy packages that were imported.
PROBE = """
import atexit, sys
atexit.register(lambda: print("imported:", *[m for m in {heavy!r} if m in sys.modules]))
sys.argv = ["leantrain", *sys.argv[1:]]
from leantrain.cli import main
main()
"""


def probe(*args: str) -> tuple[int, str, str, list[str]]:
    """(exit code, stdout before the probe line, stderr, heavy packages imported) of ``leantrain *args``."""
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True)
    out, _, imported = proc.stdout.rpartition("imported:")
    return proc.returncode, out, proc.stderr, imported.split()
