"""PaCA: Partial Connection Adaptation (Woo et al., "PaCA: Partial Connection Adaptation for Efficient Fine-Tuning",
ICLR 2025, arXiv 2503.01905), plus QPaCA over an int8 weight-only quantized base.

Instead of adding low-rank branches next to a frozen ``nn.Linear`` (LoRA), PaCA fine-tunes ``r`` randomly chosen
*input columns* of the pretrained weight (all outgoing connections of ``r`` input neurons). Forward and backward stay
a single GEMM each, and the weight gradient needs only the ``r`` selected input channels of the activation, so the
layer saves ``tokens x r`` activation values instead of LoRA's ``tokens x in_features``.

This module is plain PyTorch (no PEFT). Deliberate departures from the official code (``WooSunghyeon/paca``):

- Delta parameterization, as in the Hugging Face PEFT port: the trainable ``paca_delta`` (``out x r``) starts at zero
  and the effective columns are ``W[:, S] + s * paca_delta`` with ``s = paca_alpha / r``. The official fork trains the
  scaled column itself, so AdamW weight decay there shrinks the pretrained weights; here it shrinks only the update.
  (To get the official behaviour, add ``weight_decay * W[:, S]`` to the loss or use decoupled decay on the columns.)
- The columns are synced on *every* forward (the official forward skips every second sync, leaving stale columns),
  and the base weight is restored right after each GEMM, so it is never left modified: disabling the adapter gives
  the base model back exactly.
- Indices are drawn per layer from ``random_seed + crc32(layer name)`` when a seed is given (reproducible across
  processes and independent of module construction order), else from the global torch RNG. They are sorted and
  stored as int64.
- QPaCA: the paper stores the frozen weight in bitsandbytes NF4. bitsandbytes is not available here, so
  :class:`Int8WeightOnly` holds a per-output-channel symmetric int8 weight and fp32 scales, dequantized on the fly in
  forward and backward; the ``r`` selected original columns are kept in full precision, so QPaCA's trained columns
  carry no quantization error.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from leantrain.errors import ConfigError

__all__ = [
    "Int8WeightOnly",
    "PacaLinear",
    "paca_linear",
    "select_paca_indices",
    "validate_paca_args",
]


# --------------------------------------------------------------------------------------------------------------------
# Index selection and validation


def validate_paca_args(module: nn.Module, r: int, paca_alpha: float, name: str = "") -> None:
    """Raise :class:`ConfigError` unless ``module`` is an ``nn.Linear``, ``1 <= r <= in_features`` and alpha > 0."""
    label = f"module {name!r}" if name else "module"
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"PaCA supports nn.Linear only; {label} is {type(module).__name__}. Drop it from targets.")
    if not isinstance(r, int) or not 1 <= r <= module.in_features:
        raise ConfigError(f"PaCA r={r!r} for {label} must be an int in [1, in_features={module.in_features}]")
    if not paca_alpha > 0:
        raise ConfigError(f"PaCA paca_alpha={paca_alpha!r} must be > 0")


def select_paca_indices(in_features: int, r: int, seed: int | None = None, name: str = "") -> torch.Tensor:
    """Choose ``r`` of ``in_features`` input columns uniformly at random; sorted int64 tensor of shape (r,).

    With ``seed`` the draw uses its own generator seeded with ``(seed + crc32(name)) mod 2**63``, so each layer gets a
    different but reproducible set; without it the global torch RNG is used (as the official code does).
    """
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed((int(seed) + zlib.crc32(name.encode())) % 2**63)
    perm = torch.randperm(in_features, generator=generator)[:r]
    return torch.sort(perm).values.to(torch.int64)


# --------------------------------------------------------------------------------------------------------------------
# Quantized frozen weight for QPaCA


class Int8WeightOnly(nn.Module):
    """A frozen weight stored as int8 with one fp32 scale per output row (symmetric, absmax / 127).

    ``keep_columns`` (int64 indices) are additionally kept in full precision and written back on dequantization, so
    the columns PaCA trains start from the exact pretrained values. ``qweight`` and ``scale`` depend on ``weight``
    only (not on ``keep_columns``), so re-quantizing the same weight gives them back bit-exactly. With
    ``save_quantized=False`` they are non-persistent buffers, left out of ``state_dict`` (the PEFT tuner re-quantizes
    from the base weight at load time and saves only ``keep_columns`` and ``kept``).
    """

    def __init__(self, weight: torch.Tensor, keep_columns: torch.Tensor | None = None, save_quantized: bool = True):
        super().__init__()
        w = weight.detach()
        scale = w.abs().amax(dim=1).float().clamp_min(1e-12) / 127.0  # (out,)
        q = torch.round(w.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
        self.register_buffer("qweight", q, persistent=save_quantized)
        self.register_buffer("scale", scale, persistent=save_quantized)
        if keep_columns is None:
            keep_columns = torch.zeros(0, dtype=torch.int64, device=w.device)
        self.register_buffer("keep_columns", keep_columns.to(torch.int64))
        self.register_buffer("kept", w.index_select(1, self.keep_columns).clone())  # (out, r) original dtype
        self.dtype = w.dtype
        self.shape = tuple(w.shape)

    def dequantize(self) -> torch.Tensor:
        """A fresh (out, in) tensor in the original dtype; the caller may modify it."""
        w = (self.qweight.float() * self.scale[:, None]).to(self.dtype)
        if self.keep_columns.numel():
            w.index_copy_(1, self.keep_columns, self.kept)
        return w

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


# --------------------------------------------------------------------------------------------------------------------
# The autograd Function: one GEMM forward, one GEMM backward for grad_x, x[..., S] saved for grad_delta


def _apply_columns(w: torch.Tensor, adapters: Sequence[tuple[torch.Tensor, float, torch.Tensor]]) -> None:
    """In place: W[:, S_a] += s_a * delta_a for every adapter (overlapping columns add up)."""
    for idx, scale, delta in adapters:
        w.index_add_(1, idx, (scale * delta).to(w.dtype))


class _PacaFunction(torch.autograd.Function):
    """y = x W~^T + b with W~ = W + sum_a scatter_cols(S_a, s_a * delta_a).

    ``weight`` is either the frozen dense weight (modified in place through ``.data`` for the single GEMM and restored
    right after; the version counter is untouched because nothing observable changes) or an :class:`Int8WeightOnly`
    whose dequantized copy is modified freely. Saved tensors: x[..., S_a] per adapter plus references to the
    parameters/buffers (weight, deltas, indices); never the full x.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scales, *idx_and_deltas):
        n = len(scales)
        indices, deltas = idx_and_deltas[:n], idx_and_deltas[n:]
        adapters = list(zip(indices, scales, deltas, strict=True))
        y = _with_effective_weight(weight, adapters, lambda w: F.linear(x, w, bias))
        ctx.weight_source = weight if not isinstance(weight, torch.Tensor) else None
        ctx.scales = scales
        ctx.n = n
        ctx.has_bias = bias is not None
        x_cols = [x.index_select(-1, idx) for idx in indices]  # each (..., r_a)
        dense = weight if isinstance(weight, torch.Tensor) else None
        ctx.save_for_backward(dense, *indices, *deltas, *x_cols)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        n = ctx.n
        dense, *rest = ctx.saved_tensors
        indices, deltas, x_cols = rest[:n], rest[n : 2 * n], rest[2 * n :]
        weight = dense if dense is not None else ctx.weight_source
        adapters = list(zip(indices, ctx.scales, deltas, strict=True))
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _with_effective_weight(weight, adapters, lambda w: grad_y @ w)  # (..., in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        gy = grad_y.reshape(-1, grad_y.shape[-1])  # (tokens, out)
        grad_deltas = []
        for k, (x_s, scale, delta) in enumerate(zip(x_cols, ctx.scales, deltas, strict=True)):
            if ctx.needs_input_grad[4 + n + k]:
                g = gy.t().to(delta.dtype) @ x_s.reshape(-1, x_s.shape[-1]).to(delta.dtype)  # (out, r)
                grad_deltas.append(g * scale)
            else:
                grad_deltas.append(None)
        return (grad_x, None, grad_bias, None, *([None] * n), *grad_deltas)


def _with_effective_weight(weight, adapters, fn):
    """Run ``fn(W~)`` where W~ has the adapter columns applied; leave a dense ``weight`` exactly as it was."""
    if not isinstance(weight, torch.Tensor):
        w = weight.dequantize()
        _apply_columns(w, adapters)
        return fn(w)
    w = weight.data  # raw storage: no autograd, no version bump
    all_idx = torch.cat([idx for idx, _, _ in adapters])
    original = w.index_select(1, all_idx)  # (out, sum r) copy of the columns we touch
    try:
        _apply_columns(w, adapters)
        return fn(w)
    finally:
        w.index_copy_(1, all_idx, original)  # duplicates copy identical values, so restore is exact


def paca_linear(
    x: torch.Tensor,
    weight: torch.Tensor | Int8WeightOnly,
    bias: torch.Tensor | None,
    adapters: Sequence[tuple[torch.Tensor, float, torch.Tensor]],
) -> torch.Tensor:
    """Functional PaCA: ``adapters`` is a sequence of ``(indices int64 (r,), scale, delta (out, r))``."""
    if not adapters:
        w = weight if isinstance(weight, torch.Tensor) else weight.dequantize()
        return F.linear(x, w, bias)
    indices = tuple(idx for idx, _, _ in adapters)
    scales = tuple(float(s) for _, s, _ in adapters)
    deltas = tuple(d for _, _, d in adapters)
    return _PacaFunction.apply(x, weight, bias, scales, *indices, *deltas)


# --------------------------------------------------------------------------------------------------------------------
# Module wrapper


def _delta_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # half-precision bases train their columns in fp32 (as LoRA adapters do); fp32/fp64 bases keep their dtype
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


class PacaLinear(nn.Module):
    """An ``nn.Linear`` whose ``r`` input columns ``paca_indices`` are fine-tuned through ``paca_delta``.

    Plain PyTorch, one adapter, no PEFT. The PEFT tuner layer is
    :class:`leantrain.finetune.peft_tuners.paca.PacaPeftLinear`.

    Args:
        base: the pretrained layer; its weight (and bias) are frozen.
        r: number of trained input columns, in [1, in_features].
        paca_alpha: scale numerator; the column update is ``(paca_alpha / r) * paca_delta``.
        indices: explicit column indices (any order; sorted internally), else drawn at random.
        seed, name: see :func:`select_paca_indices`.
        quantize: ``"int8"`` stores the frozen weight as :class:`Int8WeightOnly` (QPaCA); ``None`` keeps it dense.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        paca_alpha: float = 16.0,
        indices: torch.Tensor | None = None,
        seed: int | None = None,
        name: str = "",
        quantize: str | None = None,
    ):
        super().__init__()
        validate_paca_args(base, r, paca_alpha, name)
        if quantize not in (None, "int8"):
            raise ConfigError(f"PacaLinear quantize={quantize!r}; accepted: None or 'int8'")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.paca_alpha, self.scaling = r, float(paca_alpha), float(paca_alpha) / r
        if indices is None:
            indices = select_paca_indices(base.in_features, r, seed=seed, name=name)
        indices = torch.sort(torch.as_tensor(indices, dtype=torch.int64)).values.to(base.weight.device)
        if (
            indices.numel() != r
            or indices.unique().numel() != r
            or indices.min() < 0
            or indices.max() >= self.in_features
        ):
            raise ConfigError(f"PaCA indices must be {r} distinct values in [0, {self.in_features}); got {indices}")
        self.register_buffer("paca_indices", indices)
        base.requires_grad_(False)
        self.base = base
        self.quantized: Int8WeightOnly | None = None
        if quantize == "int8":
            self.quantized = Int8WeightOnly(base.weight, keep_columns=indices)
            base.weight = None  # the dense weight is dropped; only int8 + scales + kept columns remain
        dtype = _delta_dtype(self.quantized.dtype if self.quantized is not None else base.weight.dtype)
        self.paca_delta = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=indices.device))
        self.merged = False

    def _weight_source(self):
        return self.quantized if self.quantized is not None else self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        if self.merged:
            return paca_linear(x, self._weight_source(), self.base.bias, ())
        return paca_linear(
            x, self._weight_source(), self.base.bias, [(self.paca_indices, self.scaling, self.paca_delta)]
        )

    def get_delta_weight(self) -> torch.Tensor:
        """Dense (out, in) update: zero except columns S, which hold ``scaling * paca_delta``."""
        delta = torch.zeros(
            self.out_features, self.in_features, dtype=self.paca_delta.dtype, device=self.paca_delta.device
        )
        delta.index_copy_(1, self.paca_indices, self.scaling * self.paca_delta.detach())
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """Write the trained columns into the base weight (dense bases only); exact, zero inference cost."""
        if self.merged:
            return
        if self.quantized is not None:
            raise ConfigError("merge() on a QPaCA layer would re-quantize the weight; use to_linear() instead")
        w = self.base.weight
        self._original_columns = w.index_select(1, self.paca_indices).clone()  # (out, r), for an exact unmerge
        w.index_add_(1, self.paca_indices, (self.scaling * self.paca_delta).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit-exactly (the original columns were kept at merge time)."""
        if not self.merged:
            return
        self.base.weight.index_copy_(1, self.paca_indices, self._original_columns)
        del self._original_columns
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the trained columns folded in (dequantized for QPaCA)."""
        w = self.quantized.dequantize() if self.quantized is not None else self.base.weight.detach().clone()
        if not self.merged:
            _apply_columns(w, [(self.paca_indices, self.scaling, self.paca_delta)])
        out = nn.Linear(
            self.in_features, self.out_features, bias=self.base.bias is not None, device=w.device, dtype=w.dtype
        )
        out.weight.copy_(w)
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out

    @torch.no_grad()
    def to_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The exact rank-r LoRA equivalent: ``(A (r, in) one-hot rows selecting S, B = scaling * delta, 1.0)``.

        ``W + scaling_lora * B @ A`` equals the PaCA weight; to load it into PEFT LoRA use ``lora_alpha = r`` so that
        PEFT's scaling is 1.0.
        """
        a = torch.zeros(self.r, self.in_features, dtype=self.paca_delta.dtype, device=self.paca_delta.device)
        a[torch.arange(self.r, device=a.device), self.paca_indices] = 1.0
        return a, (self.scaling * self.paca_delta).clone(), 1.0

    def extra_repr(self) -> str:
        q = ", quantize=int8" if self.quantized is not None else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, paca_alpha={self.paca_alpha}{q}"


def lora_parameter_count(in_features: int, out_features: int, r: int) -> int:
    """LoRA's trainable count at rank r; PaCA at ``r_p`` trains ``r_p * out``, so equal budgets need ``r_p`` ~ 2r."""
    return r * (in_features + out_features)


def equal_budget_paca_rank(in_features: int, out_features: int, lora_r: int) -> int:
    """The PaCA rank whose parameter count is closest to LoRA rank ``lora_r`` (capped at in_features)."""
    return max(1, min(in_features, math.floor(lora_parameter_count(in_features, out_features, lora_r) / out_features)))
