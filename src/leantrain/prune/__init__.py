"""Pruning: the VAR regularizer (arXiv 2511.14282) and one-shot magnitude pruning with exact sparsity."""

from leantrain.prune.oneshot import prunable_modules, prune_magnitude, remove_pruning, sparsity_report
from leantrain.prune.var import VarianceAmplifyingRegularizer, is_prunable_module, var_layer_term

__all__ = [
    "VarianceAmplifyingRegularizer",
    "is_prunable_module",
    "prunable_modules",
    "prune_magnitude",
    "remove_pruning",
    "sparsity_report",
    "var_layer_term",
]
