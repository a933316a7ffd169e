"""One SAM training step done right: mixed precision, gradient accumulation, BatchNorm and DDP ``no_sync``.

For the SAM family (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR
2021, arXiv 2010.01412; :class:`~leantrain.optim.SAM`, :class:`~leantrain.optim.LayerwiseSAM`). The two-call
form (``first_step`` / ``second_step``) leaves the surrounding loop to the user, and that loop is where the
recurring SAM bugs live: ``no_sync`` wrapped around the backward only (davda54/sam #78), running statistics
updated by the perturbed pass (#17), accumulated gradients wiped by ``first_step(zero_grad=True)`` (#3, #62),
"can't unscale twice" with AMP (#97). :func:`sam_training_step` is that loop, written once.

Choices:

- Gradient accumulation over N micro-batches is *per pass*: the ascent gradient is accumulated over the whole
  window (each micro-batch loss divided by N), ``first_step`` perturbs once, then the descent gradient is
  accumulated over the same N micro-batches at w + ε. So N micro-batches of size B equal one batch of N·B
  (for a mean loss and no BatchNorm). The alternative, one perturbation per micro-batch (m-sharpness inside a
  replica), is not offered: it needs the descent gradients kept apart from the ascent ones, as F-SAM's branch does.
- Under DDP the ascent pass runs under ``no_sync`` by default: each replica perturbs with its own gradient,
  as in the SAM paper (per-accelerator ε, m-sharpness); the descent pass is all-reduced once, on its last
  micro-batch. An optimizer that steps with the first gradient (``applies_first_gradient``, LayerwiseSAM)
  needs ``ddp_no_sync=False``.
- With a GradScaler and per-replica ascent passes, an overflow seen by one replica only is shared (one
  all-reduce of a flag) so every replica skips the step and backs off its scale together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from leantrain.errors import ConfigError
from leantrain.optim.sam import bn_stats_frozen


def maybe_no_sync(model: nn.Module) -> AbstractContextManager[Any]:
    """``model.no_sync()`` for a ``DistributedDataParallel`` model, else a context that does nothing.

    It must wrap the forward **and** the backward of SAM's first pass. DDP decides during the forward whether
    the coming backward all-reduces (``require_backward_grad_sync`` is read there), so wrapping the backward
    alone, as davda54/sam's README does, still all-reduces (issue #78). Wrapped correctly, each replica
    perturbs the weights with its own gradient, the per-replica ε of the SAM paper (m-sharpness with m = the
    per-replica batch). :func:`sam_training_step` does exactly this for the first pass.
    """
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def sam_training_step(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Any,
    optimizer: Any,
    grad_scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    ddp_no_sync: bool = True,
) -> torch.Tensor:
    """One SAM step over one batch or a list of micro-batches; returns the mean first-pass loss (0-dim, detached).

    ``batches`` is one batch (a tensor, tuple, dict, ...) or a *list* of micro-batches; ``loss_fn(model, batch)``
    returns the mean loss of one (micro-)batch. Pass 1 accumulates the gradient at w over every micro-batch (each
    loss divided by their number), then ``optimizer.first_step``; pass 2 does the same at w + ε with BatchNorm
    statistics frozen (forwards and backwards inside), then ``optimizer.second_step``. ``optimizer`` is a
    :class:`~leantrain.optim.SAM`, a :class:`~leantrain.optim.LayerwiseSAM` or anything with
    ``first_step(zero_grad)`` / ``second_step(zero_grad)`` (plus ``grad_scaler=`` when one is given).
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forwards under ``torch.autocast``; ``grad_scaler``
    scales the backward losses and is handed to both steps. ``ddp_no_sync`` keeps DDP from all-reducing the
    first pass (per-replica perturbations); the second pass is always all-reduced.
    """
    micro = list(batches) if isinstance(batches, list) else [batches]  # a tuple is one (inputs, targets) batch
    if not micro:
        raise ConfigError("sam_training_step got batches=[]; pass one batch or a non-empty list of micro-batches")
    is_ddp = isinstance(model, DistributedDataParallel)
    if is_ddp and ddp_no_sync and getattr(optimizer, "applies_first_gradient", False):
        raise ConfigError(
            f"sam_training_step: {type(optimizer).__name__} steps with the first-pass gradient, which must be "
            "all-reduced under DDP; pass ddp_no_sync=False"
        )
    if is_ddp and hasattr(optimizer, "use_ddp"):
        optimizer.use_ddp(model)  # LayerwiseSAM: its second pass must bypass DDP's reducer
    if grad_scaler is not None and not grad_scaler.is_enabled():
        grad_scaler = None
    scaler_kw = {} if grad_scaler is None else {"grad_scaler": grad_scaler}
    device_type = next(model.parameters()).device.type

    def backward(batch: Any) -> torch.Tensor:
        with torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            loss = loss_fn(model, batch)
        scaled = loss / len(micro)
        (grad_scaler.scale(scaled) if grad_scaler is not None else scaled).backward()
        return loss.detach()

    def pass_over(per_replica: bool) -> list[torch.Tensor]:
        # DDP all-reduces once, on the last micro-batch, unless the whole pass is per replica
        last = len(micro) - 1
        losses = []
        for i, batch in enumerate(micro):
            with maybe_no_sync(model) if per_replica or i < last else contextlib.nullcontext():
                losses.append(backward(batch))
        return losses

    model.zero_grad(set_to_none=True)
    per_replica = is_ddp and ddp_no_sync
    losses = pass_over(per_replica)
    if per_replica and grad_scaler is not None:
        _share_overflow(model)
    optimizer.first_step(zero_grad=True, **scaler_kw)
    if getattr(optimizer, "needs_second_pass", True):  # LW-SAM's warm-up steps apply the first gradient only
        with bn_stats_frozen(model):
            pass_over(False)
    optimizer.second_step(zero_grad=True, **scaler_kw)
    return torch.stack(losses).mean()


@torch.no_grad()
def _share_overflow(model: DistributedDataParallel) -> None:
    """If any replica's (unsynced, scaled) first-pass gradient overflowed, make every replica's overflow.

    Each replica's GradScaler only sees its own gradients; without this a replica that overflowed skips the
    step while the others take it, and the weights drift apart. Poisoning one gradient with NaN makes every
    replica's ``first_step`` record the overflow, skip the step and back its scale off identically.
    """
    grads: Sequence[torch.Tensor] = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    overflow = torch.stack([~torch.isfinite(g).all() for g in grads]).any().to(torch.float32)
    torch.distributed.all_reduce(overflow, op=torch.distributed.ReduceOp.MAX, group=model.process_group)
    if overflow.item():
        grads[0].fill_(float("nan"))
