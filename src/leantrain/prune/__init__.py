"""Pruning: the VAR regularizer (arXiv 2511.14282) and one-shot magnitude pruning with exact sparsity.

The names below are imported from their defining modules on first use, not with this package: ``leantrain
compress`` checks its arguments (:mod:`leantrain.prune.compress_args`) before torch loads, which takes seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leantrain.prune.oneshot import prunable_modules, prune_magnitude, remove_pruning, sparsity_report
    from leantrain.prune.var import VarianceAmplifyingRegularizer, is_prunable_module, var_layer_term

_LAZY = {  # name -> defining module (both import torch)
    "prunable_modules": "leantrain.prune.oneshot",
    "prune_magnitude": "leantrain.prune.oneshot",
    "remove_pruning": "leantrain.prune.oneshot",
    "sparsity_report": "leantrain.prune.oneshot",
    "VarianceAmplifyingRegularizer": "leantrain.prune.var",
    "is_prunable_module": "leantrain.prune.var",
    "var_layer_term": "leantrain.prune.var",
}

__all__ = [
    "VarianceAmplifyingRegularizer",
    "is_prunable_module",
    "prunable_modules",
    "prune_magnitude",
    "remove_pruning",
    "sparsity_report",
    "var_layer_term",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
