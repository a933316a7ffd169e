"""The ``prune:`` section of a run config: the VAR penalty as a loop gradient transform, and the one-shot
pruning evaluation written to a run's summary (used by ``leantrain run``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

from torch import nn

from leantrain.prune.oneshot import prune_magnitude
from leantrain.prune.var import VarianceAmplifyingRegularizer


def var_transforms(cfg, model: nn.Module) -> list[Callable[[nn.Module], None]]:
    """``[transform]`` adding λ·∇ψ to the gradients after every backward pass, or ``[]`` when ``var_lam`` is 0."""
    if cfg.var_lam == 0:
        return []
    penalty = VarianceAmplifyingRegularizer(model, lam=cfg.var_lam, r=cfg.var_r, eps=cfg.var_eps)
    return [lambda _model: penalty.accumulate_grad()]


def pruned_metrics(
    model: nn.Module, sparsities: Sequence[float], scope: str, evaluate: Callable[[nn.Module], dict[str, float]]
) -> dict[str, dict[str, float]]:
    """{sparsity: evaluate(pruned copy)} after one-shot magnitude pruning of a copy at each sparsity."""
    out = {}
    for sparsity in sparsities:
        pruned = copy.deepcopy(model)
        prune_magnitude(pruned, sparsity, scope=scope)
        out[f"{sparsity:g}"] = evaluate(pruned)
    return out
