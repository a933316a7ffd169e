"""Errors a user can cause. The CLI prints them as one line on stderr and exits with code 2."""

from __future__ import annotations


class LeantrainError(Exception):
    """A problem the user can fix (bad config, missing package, diverged run); the message says how."""


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
