"""Federated algorithms: plain classes that say what each client receives, trains and sends, and how the server
aggregates. The same objects run in leantrain's simulator and, through ``leantrain.federated.flower``, on Flower.

Each algorithm lives in its own module; :func:`make_algorithm` builds one by name with its keyword options.
"""

from __future__ import annotations

import importlib
from typing import Any

from leantrain.errors import ConfigError
from leantrain.federated.algorithms.base import Algorithm, ClientContext, Instruction, Reply
from leantrain.federated.algorithms.fedavg import FedAvg

# name -> (module under leantrain.federated.algorithms, class)
ALGORITHMS: dict[str, tuple[str, str]] = {
    "fedavg": ("fedavg", "FedAvg"),
    "fedlama": ("fedlama", "FedLAMA"),
    "fedluar": ("fedluar", "FedLUAR"),
    "fedpa": ("partial_averaging", "PartialAveraging"),
    "embracingfl": ("embracingfl", "EmbracingFL"),
    "kd": ("ondevice_kd", "OnDeviceKD"),
    "prism": ("prism", "PriSM"),
    "timelyfl": ("timelyfl", "TimelyFL"),
    "fedbuff": ("fedbuff", "FedBuff"),
    "gptfl": ("gptfl", "GPTFL"),
}


def algorithm_class(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown federated algorithm {name!r}; choices: {', '.join(ALGORITHMS)}")
    module, cls = ALGORITHMS[name]
    return getattr(importlib.import_module(f"leantrain.federated.algorithms.{module}"), cls)


def make_algorithm(name: str, **options: Any) -> Algorithm:
    """Build algorithm ``name`` (see ``ALGORITHMS``) with its keyword options."""
    cls = algorithm_class(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise ConfigError(f"{name}: {err}") from None


__all__ = ["ALGORITHMS", "Algorithm", "ClientContext", "FedAvg", "Instruction", "Reply", "algorithm_class",
           "make_algorithm"]  # fmt: skip
