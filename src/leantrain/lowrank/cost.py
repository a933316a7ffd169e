"""Analytic training cost of a model in its current phase: multiply-accumulates of its Linear and Conv2d layers.

DRA's efficiency claim is about compute, and its phases differ in what they run: a low-rank layer costs
r·(C_in·k² + C_out) MACs per output pixel instead of C_out·C_in·k², the full-rank phase costs the dense
layer, and the adapter phase runs the frozen dense layer *plus* the adapter (no saving in the forward pass;
it saves only the frozen weight's gradient and optimizer state). :func:`training_macs` counts, per sample,

- forward: every Linear / Conv2d call, MACs = output elements × (input features per output, i.e. C_in/groups · k²
  for a conv, in_features for a linear layer);
- backward, input gradient: the same count again for every call whose input needs a gradient (not the first
  layer fed by the data);
- backward, weight gradient: the same count again for every call whose weight is trainable.

Training FLOPs = 2 × MACs. BatchNorm, activations, pooling, the loss and the optimizer update are not counted
(they are linear in the activations or parameters and small next to the convolutions of a ResNet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TrainingCost:
    """Per-sample multiply-accumulates of one training step's forward and backward passes."""

    forward: int
    input_grad: int
    weight_grad: int

    @property
    def total(self) -> int:
        return self.forward + self.input_grad + self.weight_grad

    @property
    def flops(self) -> int:
        """2 × total MACs."""
        return 2 * self.total


def training_macs(model: nn.Module, example: torch.Tensor) -> TrainingCost:
    """Count one training step's MACs per sample of ``model`` on a batch shaped like ``example`` (B, ...)."""
    counts = {"forward": 0, "input_grad": 0, "weight_grad": 0}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        w = module.weight
        fan_in = w[0].numel()  # C_in/groups · kh · kw for a conv, in_features for a linear layer
        macs = output.numel() * fan_in
        counts["forward"] += macs
        if inputs[0].requires_grad:
            counts["input_grad"] += macs
        if w.requires_grad:
            counts["weight_grad"] += macs

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()  # BatchNorm running statistics untouched
        with torch.enable_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    batch = example.shape[0]
    return TrainingCost(**{k: v // batch for k, v in counts.items()})
