"""Errors a user can cause, and interruptions. The CLI prints them as one line on stderr.

A :class:`LeantrainError` exits with code 2, an :class:`Interrupted` with 130 (the shell's code for Ctrl-C);
anything else is a bug: one line, the path of a file with the full traceback, exit code 1.
"""

from __future__ import annotations


class LeantrainError(Exception):
    """A problem the user can fix (bad config, missing package, diverged run); the message says how."""

    exit_code = 2


class ConfigError(LeantrainError):
    """A recipe, override or config value is invalid."""


class MissingDependencyError(LeantrainError):
    """An optional package or data file is absent; the message names the exact install command."""

    def __init__(self, what: str, install: str):
        super().__init__(f"{what} is not installed; install it with: {install}")
        self.what = what
        self.install = install


class NonFiniteLossError(LeantrainError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class Interrupted(LeantrainError):
    """Ctrl-C stopped the work; the message says what was kept and how to continue."""

    exit_code = 130
