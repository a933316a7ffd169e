"""VAR, the Variance Amplifying Regularizer (arXiv 2511.14282, v1; v2 renames it the Weight Concentration
Regularizer, WCR).

One-shot magnitude pruning at high sparsity hurts normally trained nets because many weights sit near the
pruning threshold. VAR adds λ·ψ(w) to the loss with ψ(w) = Σ_layers 1/(Var(w̃) + ε), where w̃_i = sqrt(w_i² + r)
is a smooth |w| and Var is the population variance of the layer's smoothed magnitudes. Descending on ψ grows
the weights above the layer's mean magnitude and shrinks those below it toward zero ("rich get richer"), so a
later magnitude prune removes mostly negligible weights. Per layer,
∂ψ/∂w_i = −(2/n)·(w̃_i − mean w̃)·(w_i/w̃_i)/(Var + ε)².

Deliberate departures and choices:

- Only the v1 formula is implemented, and ``variant="v1"`` is an explicit argument so a v2 (WCR) form can be
  added without silently changing what old configs compute; we could not verify the v2 formula.
- The paper does not say which tensors count as "layers". The default is the ``weight`` of every ``nn.Linear``
  and ``nn.Conv*d`` (ndim > 1): kernels only, no biases, norms or embeddings. ``param_filter(name, param)``
  overrides it. Layers are read at every call, with a pruning mask applied afresh, so the penalty (and
  :meth:`VarianceAmplifyingRegularizer.accumulate_grad` after the task loss's backward) keeps working on a model
  pruned with :func:`~leantrain.prune.prune_magnitude` (the gradient then reaches ``weight_orig`` through the
  mask).
- The variance is computed in at least float32 (as the reference sketch does) even for half-precision
  weights, because E[w̃²] − E[w̃]² cancels badly in fp16/bf16; float64 weights stay float64.
- λ has no default: the paper's value was not retrievable. The spec suggests calibrating λ so the penalty
  is 1–10% of the task loss at initialization.
- The penalty is unbounded below by norm growth (scaling every weight raises Var); keep weight decay on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import prune

from leantrain.errors import ConfigError

ParamFilter = Callable[[str, torch.Tensor], bool]


def is_prunable_module(module: nn.Module) -> bool:
    """The default layer set of VAR and pruning: ``nn.Linear`` and ``nn.Conv*d`` with a weight of ndim > 1."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear | _ConvNd) and isinstance(weight, torch.Tensor) and weight.ndim > 1


def var_layer_term(weight: torch.Tensor, r: float = 1e-8, eps: float = 1e-8) -> torch.Tensor:
    """1/(Var(w̃) + ε) for one layer, w̃ = sqrt(w² + r), Var the population variance over all entries."""
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))  # fp16/bf16 -> fp32, fp64 stays
    wt = torch.sqrt(w.pow(2) + r)  # same shape as weight
    var = wt.pow(2).mean() - wt.mean().pow(2)
    return 1.0 / (var + eps)


def _current_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as the next forward will compute it. For a module pruned with ``torch.nn.utils.prune``
    the ``weight`` attribute is the product computed by the *last* forward (or by the pruning call), whose graph a
    ``backward`` may already have freed; the mask is applied afresh here, so the gradient reaches ``weight_orig``."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == "weight":
            return hook.apply_mask(module)
    return module.weight


def _check_nonneg(name: str, value: object, accepted: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
        raise ConfigError(f"VarianceAmplifyingRegularizer {name}={value!r} is invalid; {accepted}")
    return float(value)


class VarianceAmplifyingRegularizer:
    """Callable returning λ·Σ_layers 1/(Var(w̃) + ε); add its output to the task loss.

    ``model_or_params`` is a module (layers picked by the default set or by ``param_filter(name, param)`` over
    ``named_parameters()``) or an iterable of tensors (``param_filter`` then sees names ``"0"``, ``"1"``, ...;
    by default every tensor with ndim > 1 is kept).
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[torch.Tensor],
        lam: float,
        r: float = 1e-8,
        eps: float = 1e-8,
        param_filter: ParamFilter | None = None,
        variant: str = "v1",
    ):
        self.lam = _check_nonneg("lam", lam, "lam is the penalty weight λ and must be >= 0")
        self.r = _check_nonneg("r", r, "r is the smoothing term of sqrt(w² + r) and must be >= 0")
        self.eps = _check_nonneg("eps", eps, "eps keeps 1/(Var + eps) finite and must be >= 0")
        if variant != "v1":
            raise ConfigError(
                f"VarianceAmplifyingRegularizer variant={variant!r} is invalid; only 'v1' (arXiv 2511.14282v1) "
                "is implemented"
            )
        self.variant = variant
        self._getters = self._collect(model_or_params, param_filter)
        if not self._getters:
            raise ConfigError(
                "VarianceAmplifyingRegularizer found no matching parameters; pass a model with nn.Linear/nn.Conv*d "
                "layers, tensors with ndim > 1, or a param_filter(name, param) that selects some"
            )

    @staticmethod
    def _collect(
        source: nn.Module | Iterable[torch.Tensor], param_filter: ParamFilter | None
    ) -> list[tuple[str, Callable[[], torch.Tensor]]]:
        if isinstance(source, nn.Module):
            if param_filter is None:
                # read the weight at every call: after torch.nn.utils.prune it is weight_orig * weight_mask
                return [
                    (f"{name}.weight" if name else "weight", lambda m=m: _current_weight(m))
                    for name, m in source.named_modules()
                    if is_prunable_module(m)
                ]
            named = list(source.named_parameters())
        else:
            named = [(str(i), p) for i, p in enumerate(source)]
        keep = param_filter or (lambda _name, p: p.ndim > 1)
        return [(name, lambda p=p: p) for name, p in named if keep(name, p)]

    @property
    def names(self) -> list[str]:
        """Names of the tensors that enter the penalty, in order."""
        return [name for name, _ in self._getters]

    def layer_terms(self) -> torch.Tensor:
        """The unweighted per-layer terms 1/(Var(w̃) + ε), shape (L,)."""
        return torch.stack([var_layer_term(get(), self.r, self.eps) for _, get in self._getters])

    def __call__(self) -> torch.Tensor:
        return self.lam * self.layer_terms().sum()

    def accumulate_grad(self) -> torch.Tensor:
        """Add λ·∇ψ to the ``.grad`` of the penalised weights (as ``(loss + penalty).backward()`` would).

        This is the form for a loop that has already called ``loss.backward()`` (the leantrain loop's
        ``grad_transforms``); returns the penalty's value, detached.
        """
        penalty = self()
        if penalty.requires_grad:
            penalty.backward()
        return penalty.detach()

    def __repr__(self) -> str:
        return (
            f"VarianceAmplifyingRegularizer(lam={self.lam}, r={self.r}, eps={self.eps}, variant={self.variant!r}, "
            f"layers={len(self._getters)})"
        )
