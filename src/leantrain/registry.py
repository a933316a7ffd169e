"""A named registry: the mapping of names to builders that recipes, the config, the CLI and tests iterate.

``OPTIMIZERS = Registry("optimizer")``, ``@OPTIMIZERS.register("sam")`` on a builder, ``OPTIMIZERS.pick(name)``
returns it or raises a :class:`~leantrain.errors.ConfigError` listing the registered names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from leantrain.errors import ConfigError

T = TypeVar("T")


class Registry(dict[str, T]):
    """A dict of name -> entry with a decorator to add entries and a lookup that names the choices."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            self[name] = entry
            return entry

        return add

    def pick(self, name: str) -> T:
        if name not in self:
            raise ConfigError(f"unknown {self.what} {name!r}; choose from: {', '.join(self)}")
        return self[name]
