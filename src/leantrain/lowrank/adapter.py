"""DRA's deflated form: a frozen dense layer plus a trainable, zero-initialised low-rank adapter.

After its full-rank window DRA (arXiv 2508.08625) does not truncate the dense weight back to rank r (that
would change the function at the switch); it freezes W and trains a LoRA-style branch next to it:
``y = W x + (alpha / r) · up(down(x))`` with ``up`` zero-initialised, so the switch preserves the function
exactly. For a conv layer ``down`` is a k×k conv C_in -> r carrying the dense layer's stride, padding and
dilation, and ``up`` a 1×1 conv r -> C_out, as in the official code; for a linear layer both are linear maps.

Deliberate departures and choices:

- ``down`` gets Glorot-uniform init (Keras' default, which the official code uses); ``up`` is zero.
- The frozen dense layer keeps its bias (also frozen); the adapter has none.
- ``merge()`` folds the branch into one dense module (W + alpha/r · up·down, trainable again), which is what
  a later full-rank phase or a deployment export needs.
"""

from __future__ import annotations

import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.lowrank.factorized import dense_like


class LowRankAdapter(nn.Module):
    """``base(x) + (alpha / rank) · up(down(x))`` around a frozen ``nn.Linear`` / ``nn.Conv2d`` (groups=1)."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float = 16.0):
        super().__init__()
        if not (isinstance(base, nn.Linear) or (isinstance(base, nn.Conv2d) and base.groups == 1)):
            raise ConfigError(f"LowRankAdapter wraps an nn.Linear or a non-grouped nn.Conv2d, got {base!r}")
        w = base.weight
        full = min(w.shape[0], w[0].numel())
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= full:
            raise ConfigError(f"LowRankAdapter rank={rank!r} is invalid; it must be an integer in [1, {full}]")
        if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
            raise ConfigError(f"LowRankAdapter alpha={alpha!r} is invalid; it must be > 0")
        self.base, self.rank, self.alpha = base.requires_grad_(False), rank, float(alpha)
        self.scaling = self.alpha / rank
        kw = {"device": w.device, "dtype": w.dtype}
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False, **kw)
            self.up = nn.Linear(rank, base.out_features, bias=False, **kw)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False, padding_mode=base.padding_mode, **kw)  # fmt: skip
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **kw)
        nn.init.xavier_uniform_(self.down.weight)  # Keras' default, as the official code
        nn.init.zeros_(self.up.weight)
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.up(self.down(x))

    def composed_weight(self) -> torch.Tensor:
        """The dense weight the layer computes with, W + alpha/r · up·down, shaped like ``base.weight``."""
        w = self.base.weight
        delta = self.up.weight.flatten(1) @ self.down.weight.flatten(1)  # (out, r) @ (r, in·k·k)
        return w + self.scaling * delta.reshape(w.shape)

    def merge(self) -> nn.Linear | nn.Conv2d:
        """A new trainable dense module equal to this one (same outputs up to rounding)."""
        return dense_like(self.base, self.composed_weight().detach(), self.base.bias, self.training)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"
