"""Run the ``leantrain`` command in-process for tests: (exit code, stdout, stderr)."""

import sys

from leantrain.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    old = sys.argv
    sys.argv = ["leantrain", *args]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err
