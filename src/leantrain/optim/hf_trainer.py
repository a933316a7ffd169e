"""Hugging Face ``Trainer`` adapter for the SAM family: the perturbed second pass inside ``training_step``.

For Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization" (ICLR 2021, arXiv
2010.01412) and the variants built on :class:`~leantrain.optim.SAM`. The ``Trainer`` runs forward/backward itself
and then calls ``optimizer.step()`` with no closure, so a SAM optimizer passed through
``Trainer(optimizers=(sam, scheduler))`` needs the second pass done for it. :class:`SharpnessAwareTrainer` does
it: gradient at w (the usual step), ``first_step()``, gradient at the perturbed weights with BatchNorm statistics
frozen, and the Trainer's own ``optimizer.step()`` then restores w and applies the base optimizer
(``SAM.step()`` without a closure after ``first_step()`` is ``second_step()``).

AsyncSAM with an ``Ascent`` (a separate ascent batch, or the two-process mode) needs one pass per step:
``perturb()`` moves to w + ε_{t−1} and the Trainer's own forward/backward and ``optimizer.step()`` do the rest.

Deliberate departures and choices:

- Gradient accumulation (N micro-batches per step) follows :mod:`leantrain.optim.sam_step`: the ascent gradient
  is accumulated over the whole window (the Trainer's own passes), ``first_step`` perturbs once on the last
  micro-batch, and the window's inputs, kept until then, are replayed at w + ε to accumulate the descent gradient.
  The Trainer's loss scaling is reused unchanged (each micro-batch loss divided by N, or by
  ``num_items_in_batch`` when the model takes it). Under DDP the ascent gradient is all-reduced (the Trainer syncs
  the window's last backward), so every replica perturbs with the same ε, unlike ``sam_training_step``'s default.
- fp16 (accelerate's GradScaler): SAM's own ``grad_scaler=`` bookkeeping is not used, because accelerate calls
  ``scaler.step(sam)`` itself. The first-pass gradient is checked here: with inf/NaN nothing is perturbed and
  the gradient is left as it is, so the scaler skips the step and backs off. Otherwise it is unscaled in place
  (ε does not depend on the scale, but LayerwiseSAM steps its unchosen layers with it) before ``first_step``.
  When the scaler skips ``optimizer.step()`` (a descent-pass overflow), ``second_step`` never runs; a callback
  then calls :meth:`SAM.cancel_step` right after the optimizer step, before logging, evaluation or saving, so the
  model is back at w bit-exactly. ``sam.last_step_skipped`` tells whether the Trainer's last step was skipped.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from leantrain.errors import ConfigError
from leantrain.optim.sam import SAM, _grads_finite, bn_stats_frozen

try:
    from transformers import Trainer, TrainerCallback
except ImportError as err:  # pragma: no cover - transformers is a core dependency
    raise ImportError("SharpnessAwareTrainer needs transformers: pip install transformers") from err


class SharpnessAwareTrainer(Trainer):
    """``transformers.Trainer`` whose ``training_step`` performs SAM's two passes (pass the optimizer in)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._sam_window: list[tuple[Any, Any]] = []  # (inputs, num_items_in_batch) of this accumulation window
        self.add_callback(_SkippedStepGuard(self))

    def _sam(self) -> SAM:
        sam = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps the optimizer
        if not isinstance(sam, SAM):
            raise ConfigError("SharpnessAwareTrainer needs a leantrain SAM optimizer: Trainer(optimizers=(sam, None))")
        return sam

    def training_step(self, model, inputs, num_items_in_batch=None):
        sam = self._sam()
        if getattr(sam, "ascent", None) is not None:  # AsyncSAM with its own ascent: one pass, at w + ε
            if not sam.perturbed:  # the window's first micro-batch
                sam.perturb()
            return super().training_step(model, inputs, num_items_in_batch)
        loss = super().training_step(model, inputs, num_items_in_batch)  # gradient at w, accumulated over the window
        self._sam_window.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return loss  # not the window's last micro-batch: optimizer.step() comes later
        window, self._sam_window = self._sam_window, []
        if isinstance(model, DistributedDataParallel) and hasattr(sam, "use_ddp"):
            sam.use_ddp(model)  # LayerwiseSAM: its second pass bypasses DDP's reducer and all-reduces w' itself
        if not self._ascend(sam) or not getattr(sam, "needs_second_pass", True):
            return loss  # overflow, or a LayerwiseSAM warm-up step (it applies the first gradient)
        try:
            with bn_stats_frozen(model):
                for i, (batch, count) in enumerate(window):
                    # like the Trainer's own passes: only the window's last backward all-reduces under DDP
                    sync = self.accelerator.no_sync(model) if i < len(window) - 1 else contextlib.nullcontext()
                    with sync:
                        super().training_step(model, batch, count)  # gradient at w + ε
        except BaseException:
            sam.cancel_step()  # never leave the model at w + ε
            raise
        return loss

    @torch.no_grad()
    def _ascend(self, sam: SAM) -> bool:
        """``first_step`` with the window's gradient; False (nothing perturbed) if the scaled gradient overflowed."""
        scaler = self.accelerator.scaler
        if scaler is not None and scaler.is_enabled():
            if not _grads_finite(sam.param_groups):
                return False  # left as is: scaler.step(sam) finds the inf/NaN, skips the step and backs off
            inv_scale = 1.0 / scaler.get_scale()  # exact for the usual power-of-2 scales
            for group in sam.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(inv_scale)
        sam.first_step(zero_grad=True)
        return True


class _SkippedStepGuard(TrainerCallback):
    """Puts the model back at w when the Trainer's ``optimizer.step()`` did not reach ``second_step``."""

    def __init__(self, trainer: SharpnessAwareTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._sam_window.clear()  # inputs of a window an earlier, interrupted train() left unfinished

    def on_optimizer_step(self, args, state, control, **kwargs):
        sam = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        if isinstance(sam, SAM):
            cancelled = sam.cancel_step()  # still at w + ε: the GradScaler skipped sam.step() on inf/NaN
            sam.last_step_skipped = cancelled or self.trainer.accelerator.optimizer_step_was_skipped
