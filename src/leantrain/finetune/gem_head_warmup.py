"""Head warm-up before GEM's scoring pass: score through a trained head (ours, not the paper's).

GEM (Kang et al., arXiv 2508.16191; official code ``sungminkg/GEM_PEFT``) ranks weights by the gradient of the task
loss from one pass over training data. The paper scores through the model's pretrained LM head (its tasks are
classification by option log-likelihood), so that gradient carries task signal. Our classifiers put a freshly
initialised head on the encoder; scored through it, the gradient reaching the target layers points along the head's
random directions, not along those of a head that fits the task. So before the gradient pass, the modules the
adapter will train anyway (``modules_to_save``, e.g. ``["classifier"]``) are trained alone for
``head_warmup_steps`` AdamW steps on the scoring batches; the warmed-up head stays in the model and then trains on
as a module to save. Every other parameter is left bit-identical. The official code has no such step (it trains no
head at all).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from leantrain.errors import LeantrainError


def find_head_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Modules whose full name ends with one of ``names`` (PEFT's ``modules_to_save`` rule); an error if none do."""
    found = {n: m for n, m in model.named_modules() if n and any(n.endswith(key) for key in names)}
    if not found:
        children = ", ".join(n for n, _ in model.named_children())
        raise LeantrainError(
            f"GEM head warm-up: modules_to_save={list(names)!r} matched no module of {type(model).__name__}; name "
            f"modules of the model (its top-level children: {children}) or set head_warmup_steps=0"
        )
    return found


def warm_up_head(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    modules: dict[str, nn.Module],
    steps: int,
    lr: float,
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    train_mode: bool = True,
) -> list[float]:
    """Train only the parameters of ``modules`` for ``steps`` AdamW steps on ``batches`` (cycled); returns the losses.

    All other parameters stay bit-identical; requires_grad flags, ``.grad`` fields and train/eval mode are restored.
    """
    if not batches:
        raise LeantrainError("GEM head warm-up: the scoring batches are empty")
    head = {id(p): p for m in modules.values() for p in m.parameters()}
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    losses = []
    try:
        for p in params:
            p.requires_grad_(id(p) in head)
            p.grad = None
        model.train(train_mode)
        optimizer = torch.optim.AdamW(list(head.values()), lr=lr, weight_decay=0.0)
        for step in range(steps):
            loss = loss_fn(model, batches[step % len(batches)])
            if not torch.isfinite(loss):
                raise LeantrainError(
                    f"GEM head warm-up: non-finite loss {loss.item()} at step {step}; lower head_warmup_lr"
                )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        for p, flag, grad in zip(params, saved_flags, saved_grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    return losses
