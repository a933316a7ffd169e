"""Client engines: how the simulator trains a round's cohort (one after another, vectorised, over workers).

Every engine yields one :class:`ClientOutcome` per sampled client; the simulator's intake checks, guards and folds
them the same way whichever engine produced them, so engines change speed, never results (tests hold each engine to
the sequential one). Built by name with :func:`make_engine`; modules are imported only when chosen.
"""

from __future__ import annotations

import importlib
from typing import Any

from leantrain.errors import ConfigError
from leantrain.federated.engines.base import DROPPED, ClientOutcome, Engine

# name -> (module under leantrain.federated.engines, class)
ENGINES: dict[str, tuple[str, str]] = {
    "sequential": ("sequential", "SequentialEngine"),
    "vmap": ("vmap", "VmapEngine"),  # clients of one architecture trained together (torch.func); else sequential
    "auto": ("vmap", "AutoEngine"),  # vmap where supported and measured faster, sequential otherwise
}


def make_engine(engine: str | Engine, **options: Any) -> Engine:
    """An engine instance from its name (see ``ENGINES``) or the instance itself."""
    if isinstance(engine, Engine):
        return engine
    if engine not in ENGINES:
        raise ConfigError(f"unknown client engine {engine!r}; choose from: {', '.join(ENGINES)}")
    module, cls = ENGINES[engine]
    try:
        return getattr(importlib.import_module(f"leantrain.federated.engines.{module}"), cls)(**options)
    except TypeError as err:
        raise ConfigError(f"engine {engine}: {err}") from None


__all__ = ["DROPPED", "ENGINES", "ClientOutcome", "Engine", "make_engine"]
