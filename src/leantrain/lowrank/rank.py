"""Effective rank of weights, the quantity DRA (arXiv 2508.08625) tracks to show rank collapse.

The effective rank of Roy and Vetterli ("The effective rank: a measure of effective dimensionality",
EUSIPCO 2007) is erank(W) = exp(−Σ p_i ln p_i) with p_i = σ_i / Σ_j σ_j over the singular values of W. It lies
in [1, rank(W)], equals k for k equal non-zero singular values, and falls smoothly as the spectrum
concentrates, unlike the integer rank.

Deliberate departures and choices:

- The DRA paper does not spell out its formula; the entropy-based erank is the likely one (the spec marks this
  unverified).
- Conv kernels (C_out, C_in, kh, kw) are reshaped to (C_out, C_in·kh·kw), the same matrix
  :class:`~leantrain.lowrank.LowRankConv2d` factorizes; a LowRank module is measured on its composed weight.
- Singular values are computed in float64, and an all-zero weight has effective rank 0 (the entropy is
  undefined there; 0 is its integer rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from leantrain.errors import ConfigError
from leantrain.lowrank.adapter import LowRankAdapter
from leantrain.lowrank.factorized import LowRankConv2d, LowRankLinear

COMPOSITE = (LowRankLinear, LowRankConv2d, LowRankAdapter)  # layers measured on their composed weight


def effective_rank(weight: torch.Tensor | nn.Module) -> float:
    """exp(entropy of σ_i/Σσ) of a weight matrix, conv kernel (reshaped to (C_out, rest)) or layer."""
    if isinstance(weight, COMPOSITE):
        weight = weight.composed_weight()
    elif isinstance(weight, nn.Linear | nn.Conv2d):
        weight = weight.weight
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        what = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ConfigError(
            f"effective_rank got {what}; pass a weight tensor with at least 2 dimensions or a "
            "Linear / Conv2d / LowRank / LowRankAdapter module"
        )
    s = torch.linalg.svdvals(weight.detach().flatten(1).to(torch.float64))  # (min(out, rest),)
    total = s.sum()
    if not total > 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(-(p * p.log()).sum().item())


def effective_ranks(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, float]:
    """{name: effective rank} of the named layers, or of every Linear, Conv2d, LowRank and LowRankAdapter module.

    The factors inside a LowRank / LowRankAdapter module are not listed apart.
    """
    if layers is not None:
        return {name: effective_rank(model.get_submodule(name)) for name in layers}
    ranks: dict[str, float] = {}
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, COMPOSITE):
            inside.append(name)
            ranks[name] = effective_rank(mod)
        elif isinstance(mod, nn.Linear | nn.Conv2d) and not isinstance(mod.weight, UninitializedParameter):
            ranks[name] = effective_rank(mod)
    return ranks


class EffectiveRankLogger:
    """Leantrain loop callback logging the effective rank of ``layers`` (all layers if None) at every epoch.

    Each record is ``{"split": "rank", "step", "epoch", "erank_mean", "erank/<layer>": value, ...}`` in the
    run's metrics.jsonl; ``history`` keeps them in memory too. Put it after a :class:`DynamicRankSchedule` in the
    callback list so a record describes the model the next epoch trains.
    """

    def __init__(self, layers: Sequence[str] | Callable[[], Sequence[str]] | None = None):
        self.layers = layers
        self.history: list[dict] = []

    def on_train_begin(self, trainer) -> None:
        self._log(trainer)

    def on_epoch_end(self, trainer) -> None:
        self._log(trainer)

    def _log(self, trainer) -> None:
        layers = self.layers() if callable(self.layers) else self.layers
        ranks = effective_ranks(trainer.model, layers)
        record = {"split": "rank", "step": trainer.state.step, "epoch": trainer.state.epoch,
                  "erank_mean": sum(ranks.values()) / max(len(ranks), 1),
                  **{f"erank/{name}": value for name, value in ranks.items()}}  # fmt: skip
        if self.history and self.history[-1]["step"] == record["step"]:
            self.history[-1] = record  # a resumed run re-logs its starting point
        else:
            self.history.append(record)
        if trainer.logger is not None:
            trainer.logger.log(record)
