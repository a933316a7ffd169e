"""Small LeNet-style convolutional classifier (LeCun et al. 1998, "Gradient-based learning applied to
document recognition"), modernised: 3x3 convs with ReLU and 2x2 max-pooling, then one hidden FC layer.

Departures from LeNet-5: ReLU instead of tanh, max- instead of average-pooling, padding so each conv
keeps the spatial size, and configurable channel counts. Each entry of ``channels`` adds one
conv3x3-ReLU-maxpool2 stage, so H and W must be at least ``2 ** len(channels)``; the flattened size is
computed from the input shape rather than hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from leantrain.models.model_config import ModelConfig, as_image_shape, check, check_dropout, check_positive
from leantrain.models.registry import register_model


@dataclass
class CNNConfig(ModelConfig):
    """Hyper-parameters of :class:`CNN`."""

    input_shape: tuple[int, ...] = field(default=(1, 28, 28), metadata={"help": "per-sample (C, H, W) or (H, W)"})
    num_classes: int = field(default=10, metadata={"help": "number of output classes"})
    channels: tuple[int, ...] = field(default=(32, 64), metadata={"help": "output channels of each conv stage"})
    hidden: int = field(default=128, metadata={"help": "width of the hidden fully connected layer"})
    dropout: float = field(default=0.0, metadata={"help": "dropout before the output layer, in [0, 1)"})

    def validate(self) -> None:
        _, height, width = as_image_shape(self)
        check(self, "channels", len(self.channels) >= 1, "at least one conv stage")
        check_positive(self, "num_classes", "channels", "hidden")
        smallest = 2 ** len(self.channels)
        check(self, "input_shape", min(height, width) >= smallest, f"H and W >= {smallest} (2 ** len(channels))")
        check_dropout(self)


class CNN(nn.Module):
    """[Conv3x3 -> ReLU -> MaxPool2] * len(channels) -> Flatten -> Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        self.image_shape = as_image_shape(config)
        in_channels, height, width = self.image_shape
        stages: list[nn.Module] = []
        for out_channels in config.channels:
            stages += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            in_channels = out_channels
        self.features = nn.Sequential(*stages)
        # floor(floor(H / 2) / 2) == floor(H / 4), so the size after k poolings is H >> k.
        flat = in_channels * (height >> len(config.channels)) * (width >> len(config.channels))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W), or any (B, ...) with C*H*W elements per sample -> logits (B, num_classes)."""
        x = x.float().reshape(x.shape[0], *self.image_shape)  # (B, C, H, W)
        return self.classifier(self.features(x))


@register_model("cnn", CNNConfig)
def build_cnn(config: CNNConfig) -> CNN:
    """Build a :class:`CNN` from its config."""
    return CNN(config)
