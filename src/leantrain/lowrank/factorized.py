"""Low-rank factorized layers for DRA (Dynamic Rank Adjustment, arXiv 2508.08625).

DRA trains weights as low-rank factors W = up · down, temporarily *inflates* them to dense full-rank weights
to restore effective rank, then deflates back to a cheap trainable form. This module holds the swappable
layer parametrizations: :class:`LowRankLinear` (``in -> rank -> out``) and :class:`LowRankConv2d` (a k×k conv
``C_in -> r`` "down" followed by a 1×1 conv ``r -> C_out`` "up", as in the official DRA code), each with a
truncated-SVD :meth:`from_dense` and an exact :meth:`inflate`, plus :func:`factorize` / :func:`densify`,
which swap modules in place (rebuild the optimizer afterwards: the parameters are new tensors).

Deliberate departures and choices:

- ``from_dense`` initialises from the truncated SVD of the dense weight, splitting the singular values as
  √σ on both factors (down = √Σ Vᵀ, up = U √Σ), so the composed weight is the best rank-r approximation
  (Eckart–Young) and the two factors have balanced scales. The official code starts the low-rank phase from
  random init instead; that is a plain ``LowRankLinear(...)`` / ``LowRankConv2d(...)`` here.
- Conv weights are reshaped to (C_out, C_in·k·k) for the SVD, and stride, padding, dilation and padding mode
  sit on the down conv, the bias on the up conv; the 1×1 up conv is then a per-pixel linear map, so
  ``up ∘ down`` equals one dense conv with the composed kernel.
- ``factorize`` uses rank = max(1, floor(rank_ratio · out)). By default it only touches layers where that
  rank is below min(out, in·k·k), i.e. where factorizing can save something. A layer chosen explicitly
  (``layers=``) whose rank would exceed min(out, in·k·k) gets min(out, in·k·k): extra directions of a
  truncated SVD would be zero and, with both factors zero there, could never train.
- Grouped and depthwise convs are never factorized (the paper's targets are dense convs); naming one in
  ``layers`` is an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from leantrain.errors import ConfigError

LayerSelector = Sequence[str] | Callable[[str, nn.Module], bool]


def _check_rank(rank: Any, full: int, where: str) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= full:
        raise ConfigError(f"{where} rank={rank!r} is invalid; rank must be an integer in [1, {full}]")
    return rank


def _svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of a 2-D weight (out, in): up (out, r) and down (r, in), √σ on each side."""
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)  # (out,k) (k,) (k,in)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root  # (out, r)
    down = root[:, None] * vh[:rank]  # (r, in)
    return up.to(weight.dtype), down.to(weight.dtype)


class LowRankLinear(nn.Module):
    """``x -> up(down(x))`` with down: in -> rank (no bias) and up: rank -> out (carries the bias)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_rank(rank, min(in_features, out_features), "LowRankLinear")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def composed_weight(self) -> torch.Tensor:
        """The dense weight up · down, shape (out, in)."""
        return self.up.weight @ self.down.weight

    @classmethod
    def from_dense(cls, module: nn.Linear, rank: int) -> LowRankLinear:
        """Truncated-SVD factorization of ``module`` (composed weight = best rank-r approximation)."""
        lr = cls.like(module, rank)
        up, down = _svd_factors(module.weight, rank)
        with torch.no_grad():
            lr.up.weight.copy_(up)
            lr.down.weight.copy_(down)
        return lr

    @classmethod
    def like(cls, module: nn.Linear, rank: int) -> LowRankLinear:
        """Glorot-uniform random factors (Keras' default, as the official DRA code) shaped like ``module``.

        ``module``'s bias is kept.
        """
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"LowRankLinear needs an nn.Linear, got {type(module).__name__}")
        w = module.weight
        lr = cls(module.in_features, module.out_features, rank, module.bias is not None, w.device, w.dtype)
        return _glorot_with_bias(lr, module)

    def inflate(self) -> nn.Linear:
        """The equivalent dense ``nn.Linear`` (same outputs up to rounding)."""
        return dense_like(self.down, self.composed_weight(), self.up.bias, self.training)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankConv2d(nn.Module):
    """k×k conv C_in -> rank ("down", carries stride/padding/dilation) then 1×1 conv rank -> C_out ("up", bias)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        _check_rank(rank, min(out_channels, in_channels * kh * kw), "LowRankConv2d")
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.down = nn.Conv2d(
            in_channels, rank, (kh, kw), stride, padding, dilation, 1, False, padding_mode, device, dtype
        )
        self.up = nn.Conv2d(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # (B, C_in, H, W) -> (B, r, H', W') -> (B, C_out, H', W')

    def composed_weight(self) -> torch.Tensor:
        """The dense kernel, shape (C_out, C_in, kh, kw)."""
        down = self.down.weight  # (r, C_in, kh, kw)
        w = self.up.weight.flatten(1) @ down.flatten(1)  # (C_out, r) @ (r, C_in·kh·kw)
        return w.reshape(self.out_channels, *down.shape[1:])

    @classmethod
    def _shaped_like(cls, module: nn.Conv2d, rank: int) -> LowRankConv2d:
        if not isinstance(module, nn.Conv2d) or module.groups != 1:
            what = f"groups={module.groups}" if isinstance(module, nn.Conv2d) else type(module).__name__
            raise ConfigError(f"LowRankConv2d needs an nn.Conv2d with groups=1, got {what}")
        w = module.weight
        return cls(
            module.in_channels, module.out_channels, module.kernel_size, rank, module.stride, module.padding,
            module.dilation, module.bias is not None, module.padding_mode, w.device, w.dtype,
        )  # fmt: skip

    @classmethod
    def from_dense(cls, module: nn.Conv2d, rank: int) -> LowRankConv2d:
        """Truncated-SVD factorization of ``module``'s kernel reshaped to (C_out, C_in·kh·kw)."""
        lr = cls.like(module, rank)
        w = module.weight  # (C_out, C_in, kh, kw)
        up, down = _svd_factors(w.flatten(1), rank)
        with torch.no_grad():
            lr.up.weight.copy_(up[:, :, None, None])
            lr.down.weight.copy_(down.reshape(rank, *w.shape[1:]))
        return lr

    @classmethod
    def like(cls, module: nn.Conv2d, rank: int) -> LowRankConv2d:
        """Glorot-uniform random factors (Keras' default, as the official DRA code) shaped like ``module``.

        ``module``'s bias is kept.
        """
        return _glorot_with_bias(cls._shaped_like(module, rank), module)

    def inflate(self) -> nn.Conv2d:
        """The equivalent dense ``nn.Conv2d`` (same outputs up to rounding)."""
        return dense_like(self.down, self.composed_weight(), self.up.bias, self.training)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, rank={self.rank}"


def _glorot_with_bias(low: nn.Module, dense: nn.Module) -> nn.Module:
    """``low`` with Glorot-uniform factors and ``dense``'s bias on its up factor, in ``dense``'s train mode."""
    nn.init.xavier_uniform_(low.down.weight)
    nn.init.xavier_uniform_(low.up.weight)
    if dense.bias is not None:
        with torch.no_grad():
            low.up.bias.copy_(dense.bias)
    return low.train(dense.training)


def dense_like(
    template: nn.Linear | nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, training: bool
) -> nn.Linear | nn.Conv2d:
    """A new trainable dense layer holding ``weight`` (its first dimension sets the outputs) and ``bias``.

    It takes its input size, kernel, stride, padding, dilation and padding mode from ``template``.
    """
    t, out = template, weight.shape[0]
    kw = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(t, nn.Linear):
        dense: nn.Linear | nn.Conv2d = nn.Linear(t.in_features, out, bias is not None, **kw)
    else:
        dense = nn.Conv2d(t.in_channels, out, t.kernel_size, t.stride, t.padding, t.dilation, 1,
                          bias is not None, t.padding_mode, **kw)  # fmt: skip
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense.train(training)


LowRankModule = LowRankLinear | LowRankConv2d


def _full_rank(module: nn.Linear | nn.Conv2d) -> int:
    """min(out, in·k·k): the largest rank the layer's weight can have."""
    w = module.weight
    return min(w.shape[0], w[0].numel())


def _candidates(model: nn.Module) -> dict[str, nn.Linear | nn.Conv2d]:
    """Every dense Linear / non-grouped Conv2d, excluding the factors inside LowRank modules."""
    found: dict[str, nn.Linear | nn.Conv2d] = {}
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, LowRankLinear | LowRankConv2d):
            inside.append(name)
        elif name and (isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)):
            if not isinstance(mod.weight, nn.parameter.UninitializedParameter):
                found[name] = mod
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def layer_rank(module: nn.Linear | nn.Conv2d, rank_ratio: float) -> int:
    """max(1, floor(rank_ratio · out)) capped at min(out, in·k·k), the rank ``factorize`` gives ``module``."""
    return min(max(1, math.floor(rank_ratio * module.weight.shape[0])), _full_rank(module))


def select_layers(
    model: nn.Module, layers: LayerSelector | None, rank_ratio: float
) -> dict[str, nn.Linear | nn.Conv2d]:
    """The dense layers ``factorize(model, rank_ratio, layers)`` would replace, by name, in module order."""
    candidates = _candidates(model)
    if layers is None:
        return {
            n: m for n, m in candidates.items() if max(1, math.floor(rank_ratio * m.weight.shape[0])) < _full_rank(m)
        }
    if callable(layers):
        return {n: m for n, m in candidates.items() if layers(n, m)}
    if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
        raise ConfigError(f"factorize layers={layers!r} is invalid; pass a list of module names or a predicate")
    unknown = [n for n in layers if n not in candidates]
    if unknown:
        raise ConfigError(
            f"factorize layers={unknown!r} are not dense nn.Linear / non-grouped nn.Conv2d modules of the model; "
            f"factorizable names are {sorted(candidates)!r}"
        )
    return {n: candidates[n] for n in layers}


def factorize(
    model: nn.Module, rank_ratio: float = 0.5, layers: LayerSelector | None = None, init: str = "svd"
) -> list[str]:
    """Replace Linear / Conv2d modules of ``model`` in place by LowRank modules.

    rank = max(1, floor(rank_ratio · out)), capped at min(out, in·k·k). ``layers`` is a list of module names
    or a predicate ``(name, module) -> bool``; by default every layer where that rank saves something.
    ``init="svd"`` starts from the truncated SVD of the dense weight (best rank-r approximation); ``"random"``
    gives both factors Glorot-uniform init (the official DRA code's low-rank training from scratch) and
    keeps only the dense bias. Returns the replaced names. Rebuild the optimizer afterwards.
    """
    check_rank_ratio(rank_ratio, "factorize")
    if init not in ("svd", "random"):
        raise ConfigError(f"factorize init={init!r} is invalid; use 'svd' or 'random'")
    chosen = select_layers(model, layers, rank_ratio)
    if not chosen:
        raise ConfigError(
            f"factorize found nothing to factorize (rank_ratio={rank_ratio}, layers={layers!r}): no dense "
            "Linear / non-grouped Conv2d was selected where rank < min(out, in*k*k); lower rank_ratio or name "
            "the layers explicitly"
        )
    for name, mod in chosen.items():
        rank = layer_rank(mod, rank_ratio)
        cls = LowRankLinear if isinstance(mod, nn.Linear) else LowRankConv2d
        replace_module(model, name, cls.from_dense(mod, rank) if init == "svd" else cls.like(mod, rank))
    return list(chosen)


def check_rank_ratio(rank_ratio: object, where: str) -> float:
    """``rank_ratio`` as a float in (0, 1], or a ConfigError naming ``where``."""
    if not isinstance(rank_ratio, int | float) or isinstance(rank_ratio, bool) or not 0 < rank_ratio <= 1:
        raise ConfigError(f"{where} rank_ratio={rank_ratio!r} is invalid; it must be in (0, 1]")
    return float(rank_ratio)


def densify(model: nn.Module) -> list[str]:
    """Replace every LowRank module of ``model`` in place by its inflated dense module; returns their names."""
    if isinstance(model, LowRankLinear | LowRankConv2d):
        raise ConfigError("densify cannot replace the model itself in place; call model.inflate() instead")
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear | LowRankConv2d)]
    for name, mod in found:
        replace_module(model, name, mod.inflate())
    return [n for n, _ in found]
