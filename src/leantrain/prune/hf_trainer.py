"""Hugging Face ``Trainer`` adapter for loss regularizers such as VAR: the penalty added in ``compute_loss``.

``PenalizedTrainer(..., penalty=VarianceAmplifyingRegularizer(model, lam=...))`` trains on
``loss + penalty()``. The penalty enters training losses only (evaluation losses stay the task loss, so they
compare with an unregularized run). With gradient accumulation every optimizer step sees λ·∇ψ once: the penalty
follows the Trainer's own rule for dividing micro-batch losses by the accumulation steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from leantrain.errors import ConfigError

try:
    from transformers import Trainer
except ImportError as err:  # pragma: no cover - transformers is a core dependency
    raise ImportError("PenalizedTrainer needs transformers: pip install transformers") from err


class PenalizedTrainer(Trainer):
    """``transformers.Trainer`` whose training loss is the model's loss plus ``penalty()``."""

    def __init__(self, *args, penalty: Callable[[], torch.Tensor], **kwargs):
        if not callable(penalty):
            raise ConfigError(f"PenalizedTrainer penalty={penalty!r} must be a callable returning a scalar tensor")
        super().__init__(*args, **kwargs)
        self.penalty = penalty

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if not model.training:
            return out
        penalty = self.penalty()
        if self._loss_scaled_for_accumulation(kwargs.get("num_items_in_batch")):
            # training_step will not divide this loss by the accumulation steps: share the penalty out here
            penalty = penalty / getattr(self, "current_gradient_accumulation_steps", 1)
        if return_outputs:
            loss, outputs = out
            return loss + penalty, outputs
        return out + penalty

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """The Trainer's own rule (``training_step``) for whether a micro-batch loss is already divided."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return bool((accepts and num_items_in_batch is not None) or self.compute_loss_func is not None)
