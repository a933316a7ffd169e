"""`leantrain list` and `leantrain --help` answer without importing torch, transformers or sklearn (seconds)."""

import subprocess
import sys
import time
from pathlib import Path

from cli_probe import probe

LEANTRAIN = Path(sys.executable).with_name("leantrain")  # the console script of this environment


def test_list_names_recipes_datasets_and_models_without_heavy_imports():
    code, out, err, imported = probe("list")
    assert code == 0 and err == "" and imported == []
    lines = out.splitlines()
    assert lines[0] == "recipes:" and "datasets:" in lines and "models:" in lines
    names = {line.split()[0] for line in lines if line.startswith("  ")}
    assert {"digits", "shakespeare", "mlp", "tinygpt", "smollm2-135m"} <= names


def test_help_has_no_heavy_imports():
    code, out, _, imported = probe("--help")
    assert code == 0 and "compress" in out and imported == []


def test_the_console_script_lists_fast():
    seconds = []
    for _ in range(2):  # the faster of two runs: one slow start on a busy machine is not the CLI's fault
        started = time.perf_counter()
        proc = subprocess.run([str(LEANTRAIN), "list"], capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
    assert proc.returncode == 0 and "models:" in proc.stdout
    assert min(seconds) < 1.5, seconds
