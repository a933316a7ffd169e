"""Hugging Face ``Trainer`` adapter for the SAM family: the perturbed second pass inside ``training_step``.

The ``Trainer`` runs forward/backward itself and then calls ``optimizer.step()`` with no closure, so a SAM
optimizer passed through ``Trainer(optimizers=(sam, scheduler))`` needs the second pass done for it.
:class:`SharpnessAwareTrainer` does it: gradient at w (the usual step), ``first_step()``, gradient at the
perturbed weights with BatchNorm statistics frozen, and the Trainer's own ``optimizer.step()`` then restores
w and applies the base optimizer (``SAM.step()`` without a closure after ``first_step()`` is ``second_step()``).

AsyncSAM with an ``Ascent`` (a separate ascent batch, or the two-process mode) needs one pass per step:
``perturb()`` moves to w + ε_{t−1} and the Trainer's own forward/backward and ``optimizer.step()`` do the rest.
"""

from __future__ import annotations

from leantrain.errors import ConfigError
from leantrain.optim.sam import SAM, bn_stats_frozen

try:
    from transformers import Trainer
except ImportError as err:  # pragma: no cover - transformers is a core dependency
    raise ImportError("SharpnessAwareTrainer needs transformers: pip install transformers") from err


class SharpnessAwareTrainer(Trainer):
    """``transformers.Trainer`` whose ``training_step`` performs SAM's two passes (pass the optimizer in)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        sam = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps the optimizer
        if not isinstance(sam, SAM):
            raise ConfigError("SharpnessAwareTrainer needs a leantrain SAM optimizer: Trainer(optimizers=(sam, None))")
        if self.args.gradient_accumulation_steps != 1:
            raise ConfigError("SharpnessAwareTrainer supports gradient_accumulation_steps=1 only")
        if getattr(sam, "ascent", None) is not None:  # AsyncSAM with its own ascent: one pass, at w + ε
            sam.perturb()
            return super().training_step(model, inputs, num_items_in_batch)
        loss = super().training_step(model, inputs, num_items_in_batch)  # gradient at w
        sam.first_step(zero_grad=True)
        with bn_stats_frozen(model):
            super().training_step(model, inputs, num_items_in_batch)  # gradient at w + ε
        return loss
