"""What a GEM mask picked: how small its weights are and how much of the gradient it covers.

GEM (Kang et al., arXiv 2508.16191) ranks entries by R = |G| / (|W| + eps). Dividing by |W| favours entries whose
weight is close to zero: on MiniLM + tweet sentiment (query/value, 0.1% density, 512 scoring tweets), 90% of GEM's
picks lie in the smallest-|W| decile of their layer (median |W| 1.1e-3 against 4.5e-2 overall) and the mask covers
17% of the total |G|, where the top-|G| entries with the same counts cover 23%. :func:`mask_statistics` measures
these quantities for any mask, so that ablations can be compared on them; it returns plain Python numbers
(JSON-ready) for the benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from leantrain.errors import LeantrainError
from leantrain.finetune.gem import GemMaskResult, GemSparseDeltaLinear

DECILE = 0.1


def target_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Base weight of each named Linear in a plain model, one wrapped by ``apply_gem_masks`` or a GEM PeftModel.

    Out-of-place deltas leave the base weight as it was when scored; call this before merging.
    """
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for name in names:
        module = root.get_submodule(name)
        if getattr(module, "merged", False):
            raise LeantrainError(f"mask_statistics: layer {name!r} is merged; unmerge it to read the scored weight")
        if isinstance(module, GemSparseDeltaLinear):
            module = module.base
        elif hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        out[name] = module.weight.detach()
    return out


def flat_positions(mask: torch.Tensor) -> torch.Tensor:
    """int64 flat positions from int indices or a dense bool mask."""
    return torch.nonzero(mask.flatten()).flatten() if mask.dtype == torch.bool else mask.flatten().long()


def lower_decile_threshold(values: torch.Tensor) -> torch.Tensor:
    """|W| at or below which an entry is in its layer's smallest decile (the k-th smallest, k = max(1, n // 10))."""
    return torch.kthvalue(values, max(1, int(values.numel() * DECILE))).values


def median(values: torch.Tensor) -> float:
    """Median of a 1-d tensor (mean of the two middle values for an even count); NaN when empty."""
    n = values.numel()
    if n == 0:
        return float("nan")
    lo = torch.kthvalue(values, (n + 1) // 2).values
    hi = torch.kthvalue(values, n // 2 + 1).values
    return float((lo.double() + hi.double()) / 2)


def mask_statistics(
    weights: nn.Module | Mapping[str, torch.Tensor],
    gradients: Mapping[str, torch.Tensor],
    masks: GemMaskResult | Mapping[str, torch.Tensor],
) -> dict:
    """Statistics of a mask over the layers of ``gradients``.

    ``weights``: the model (plain, wrapped by ``apply_gem_masks`` or the ``apply_gem`` PeftModel, before merging) or
    a dict name -> W. ``gradients``: name -> accumulated gradient G (``GemMaskResult.gradients``). ``masks``: a
    :class:`GemMaskResult`, or name -> flat int indices or a dense bool mask. Returns plain numbers:

    - ``picks``: selected entries; ``entries``: entries of the layers.
    - ``smallest_decile_share``: share of the picks whose |W| is in the smallest 10% of |W| of their layer
      (about 0.1 for a mask blind to |W|).
    - ``median_abs_weight_picks`` / ``median_abs_weight_all``: median |W| of the picks / of all entries.
    - ``grad_mass_captured``: sum of |G| over the picks / sum of |G| over all entries.
    - ``grad_mass_top_gradient``: the same for the top-|G| entries with the same per-layer counts (the most any
      mask with these counts can capture).
    - ``per_layer``: name -> ``count``, ``smallest_decile_share``, ``grad_mass_captured``.
    """
    indices = masks.indices if isinstance(masks, GemMaskResult) else masks
    names = list(gradients)
    missing = [n for n in names if n not in indices]
    if missing:
        raise LeantrainError(f"mask_statistics: no mask for layers {missing}")
    W = target_weights(weights, names) if isinstance(weights, nn.Module) else weights
    picked_w, all_w, per_layer = [], [], {}
    in_decile = mass = top_mass = total_mass = 0.0
    for name in names:
        w = W[name].detach().abs().float().flatten().cpu()  # (n,)
        g = gradients[name].detach().abs().double().flatten().cpu()  # (n,)
        pos = flat_positions(indices[name]).cpu()  # (k,)
        k = pos.numel()
        layer_decile = float((w[pos] <= lower_decile_threshold(w)).sum())
        layer_mass = float(g[pos].sum())
        layer_total = float(g.sum())
        in_decile += layer_decile
        mass += layer_mass
        top_mass += float(torch.topk(g, k).values.sum()) if k else 0.0
        total_mass += layer_total
        picked_w.append(w[pos])
        all_w.append(w)
        per_layer[name] = {
            "count": k,
            "smallest_decile_share": layer_decile / k if k else float("nan"),
            "grad_mass_captured": layer_mass / layer_total if layer_total > 0 else float("nan"),
        }
    picks = sum(v["count"] for v in per_layer.values())
    return {
        "picks": picks,
        "entries": sum(w.numel() for w in all_w),
        "smallest_decile_share": in_decile / picks if picks else float("nan"),
        "median_abs_weight_picks": median(torch.cat(picked_w)),
        "median_abs_weight_all": median(torch.cat(all_w)),
        "grad_mass_captured": mass / total_mass if total_mass > 0 else float("nan"),
        "grad_mass_top_gradient": top_mass / total_mass if total_mass > 0 else float("nan"),
        "per_layer": per_layer,
    }
