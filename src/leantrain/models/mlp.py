"""Multilayer perceptron classifier (Rumelhart, Hinton & Williams 1986): the baseline of the model zoo.

Input of any per-sample shape is flattened, passed through Linear-ReLU(-Dropout) hidden layers and a
linear head. An empty ``hidden_sizes`` gives multinomial logistic regression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from leantrain.models.model_config import ModelConfig, check, check_dropout, check_positive
from leantrain.models.registry import register_model


@dataclass
class MLPConfig(ModelConfig):
    """Hyper-parameters of :class:`MLP`."""

    input_shape: tuple[int, ...] = field(default=(784,), metadata={"help": "per-sample input shape; flattened"})
    num_classes: int = field(default=10, metadata={"help": "number of output classes"})
    hidden_sizes: tuple[int, ...] = field(default=(256, 128), metadata={"help": "width of each hidden layer"})
    dropout: float = field(default=0.0, metadata={"help": "dropout after each hidden activation, in [0, 1)"})

    def validate(self) -> None:
        check(self, "input_shape", len(self.input_shape) >= 1, "a non-empty shape")
        check_positive(self, "input_shape", "num_classes", "hidden_sizes")
        check_dropout(self)


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] * len(hidden_sizes) -> Linear."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(config.input_shape)
        for hidden in config.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout)]
            width = hidden
        layers.append(nn.Linear(width, config.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, *input_shape) or already flat (B, prod(input_shape)) -> logits (B, num_classes)."""
        return self.net(x.float())


@register_model("mlp", MLPConfig)
def build_mlp(config: MLPConfig) -> MLP:
    """Build an :class:`MLP` from its config."""
    return MLP(config)
