"""One-shot magnitude pruning, the evaluation step of VAR (arXiv 2511.14282): after training, zero the
smallest-magnitude weights at a target sparsity, with no retraining.

The masks go through ``torch.nn.utils.prune``'s reparametrization (``weight = weight_orig * weight_mask``,
recomputed in a forward pre-hook), so further training or fine-tuning cannot revive a pruned weight: its
gradient is multiplied by the mask. :func:`remove_pruning` folds the masks into plain weights.

Deliberate departures and choices:

- Exact counts and deterministic ties. ``prune.global_unstructured`` / ``l1_unstructured`` already prune
  exactly ``round(amount·n)`` entries, but pick among equal magnitudes with ``topk``, whose tie order is
  unspecified. We rank with a stable sort on |w| instead, so ties go to the lower flat index (in global scope:
  layers in ``named_modules()`` order, each flattened row-major), and install the result with
  ``prune.custom_from_mask``. The count is Python's ``round(sparsity·n)`` (banker's rounding), as torch uses.
- The paper does not say global or per-layer, nor which tensors; both scopes are offered (``"global"``
  default, as in the spec's reproduction plan), and the default tensors are the ``weight`` of every
  ``nn.Linear`` / ``nn.Conv*d`` — the same set the VAR penalty uses. Biases, norms and embeddings are kept.
- Pruning an already pruned model ranks its masked entries first, so the new mask contains the old one and the
  count stays exact whenever the new sparsity is at least the old; a lower sparsity never revives weights
  (the old mask is kept), so the zero count can then exceed the request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import prune

from leantrain.errors import ConfigError
from leantrain.prune.var import is_prunable_module

Include = Iterable[str] | Callable[[str, nn.Module], bool] | None


def prunable_modules(model: nn.Module, include: Include = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs whose ``weight`` is pruned: the default set, or those ``include`` selects.

    ``include`` is a collection of module names (each must exist and have a weight of ndim > 1) or a callable
    ``include(name, module) -> bool`` tried on every module with such a weight.
    """
    if include is None:
        return [(n, m) for n, m in model.named_modules() if is_prunable_module(m)]
    modules = dict(model.named_modules())

    def has_weight(m: nn.Module) -> bool:
        return isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim > 1

    if callable(include):
        return [(n, m) for n, m in modules.items() if has_weight(m) and include(n, m)]
    if isinstance(include, str):
        include = [include]
    picked = []
    for name in include:
        if name not in modules or not has_weight(modules[name]):
            raise ConfigError(
                f"prune_magnitude include={name!r} is invalid; it must name a module of the model with a weight "
                "of ndim > 1 (see model.named_modules())"
            )
        picked.append((name, modules[name]))
    return picked


def _weight_is_pruned(module: nn.Module) -> bool:
    # prune.is_pruned(module) also looks at submodules, so a container would count as pruned
    hooks = module._forward_pre_hooks.values()
    return any(isinstance(h, prune.BasePruningMethod) and h._tensor_name == "weight" for h in hooks)


def _current_mask(module: nn.Module) -> torch.Tensor | None:
    return module.weight_mask if _weight_is_pruned(module) else None


def _importance(module: nn.Module) -> torch.Tensor:
    """|w| flattened, with already-masked entries ranked first (-1) so a re-prune keeps the old mask."""
    mask = _current_mask(module)
    weight = module.weight_orig if mask is not None else module.weight
    score = weight.detach().abs().float().flatten()  # (n,)
    if mask is not None:
        score = torch.where(mask.flatten() == 0, torch.full_like(score, -1.0), score)
    return score


def _keep_mask(score: torch.Tensor, n_prune: int) -> torch.Tensor:
    """1 everywhere except the ``n_prune`` smallest scores (ties: lower index first), shape like ``score``."""
    order = torch.sort(score, stable=True).indices
    keep = torch.ones_like(score)
    keep[order[:n_prune]] = 0.0
    return keep


def _install_mask(module: nn.Module, mask: torch.Tensor) -> None:
    mask = mask.view_as(module.weight).to(module.weight.dtype)
    old = _current_mask(module)
    if old is None:
        prune.custom_from_mask(module, "weight", mask)
        return
    with torch.no_grad():
        old.mul_(mask)
    module.weight = module.weight_orig * old  # what the forward pre-hook computes; refreshed now for reports


def prune_magnitude(
    model: nn.Module, sparsity: float, scope: str = "global", include: Include = None
) -> dict[str, torch.Tensor]:
    """Zero the smallest-magnitude weights so exactly ``round(sparsity·N)`` of the included entries are zero.

    ``scope="global"`` ranks all included weights together (N = their total count); ``scope="layer"`` prunes
    ``round(sparsity·n_l)`` in each layer. Returns the masks by module name (1 = kept).
    """
    if not isinstance(sparsity, int | float) or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
        raise ConfigError(f"prune_magnitude sparsity={sparsity!r} is invalid; it must be in [0, 1)")
    if scope not in ("global", "layer"):
        raise ConfigError(f"prune_magnitude scope={scope!r} is invalid; use 'global' or 'layer'")
    layers = prunable_modules(model, include)
    if not layers:
        raise ConfigError(
            "prune_magnitude found no prunable layers; the model needs nn.Linear/nn.Conv*d layers, or pass "
            "include= naming modules with a weight of ndim > 1"
        )
    scores = [_importance(m) for _, m in layers]
    if scope == "global":
        flat = torch.cat([s.to(scores[0].device) for s in scores])  # (N,)
        keep = _keep_mask(flat, round(sparsity * flat.numel()))
        masks = list(keep.split([s.numel() for s in scores]))
    else:
        masks = [_keep_mask(s, round(sparsity * s.numel())) for s in scores]
    out = {}
    for (name, module), mask in zip(layers, masks, strict=True):
        _install_mask(module, mask.to(module.weight.device))
        out[name] = module.weight_mask
    return out


def remove_pruning(model: nn.Module) -> list[str]:
    """Make every pruning mask permanent (plain ``weight`` with zeros, hooks removed); returns the module names."""
    done = []
    for name, module in model.named_modules():
        if _weight_is_pruned(module):
            prune.remove(module, "weight")
            done.append(name)
    return done


def sparsity_report(model: nn.Module, include: Include = None) -> dict[str, object]:
    """Zero fractions of the prunable weights: ``{"layers": {name: fraction}, "global": fraction, "zeros": int,
    "numel": int}``. Counts exact zeros of the effective weight (pruned or naturally zero)."""
    layers = prunable_modules(model, include)
    if not layers:
        raise ConfigError("sparsity_report found no prunable layers (nn.Linear/nn.Conv*d) in the model")
    per_layer, zeros, numel = {}, 0, 0
    for name, module in layers:
        mask = _current_mask(module)
        weight = module.weight_orig * mask if mask is not None else module.weight
        z = int((weight == 0).sum())
        per_layer[name] = z / weight.numel()
        zeros, numel = zeros + z, numel + weight.numel()
    return {"layers": per_layer, "global": zeros / numel, "zeros": zeros, "numel": numel}
