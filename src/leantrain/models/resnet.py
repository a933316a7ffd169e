"""CIFAR-style residual network of "Deep Residual Learning for Image Recognition" (He, Zhang, Ren & Sun 2016,
arXiv 1512.03385, section 4.2).

A 3x3 stem conv, then three stages of n BasicBlocks each (two 3x3 conv-BN layers plus an identity
shortcut) with 16, 32 and 64 channels, stride 2 at the start of stages two and three, global average
pooling and a linear head: depth = 6n + 2 layers with weights. Where the shape changes, the shortcut is
the paper's **option A**: the identity subsampled by 2 and zero-padded in the channel dimension, so it
adds no parameters (ResNet-20 has 0.27M, as in the paper's Table 6).

Departures: ``width`` scales the three stages (width, 2*width, 4*width; the paper is width=16), the stem
accepts any number of input channels (1 for MNIST-like data), and global average pooling averages
whatever spatial size remains, so any H, W works (28x28 ends in 7x7 feature maps instead of 8x8).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from leantrain.models.model_config import ModelConfig, as_image_shape, check, check_positive
from leantrain.models.registry import register_model


@dataclass
class ResNetConfig(ModelConfig):
    """Hyper-parameters of :class:`ResNet`."""

    input_shape: tuple[int, ...] = field(default=(1, 28, 28), metadata={"help": "per-sample (C, H, W) or (H, W)"})
    num_classes: int = field(default=10, metadata={"help": "number of output classes"})
    depth: int = field(default=20, metadata={"help": "layers with weights, 6n+2 (20, 32, 44, 56, 110)"})
    width: int = field(default=16, metadata={"help": "channels of the first stage; stages use 1x, 2x, 4x"})

    def validate(self) -> None:
        as_image_shape(self)
        check_positive(self, "num_classes", "width")
        check(self, "depth", self.depth >= 8 and (self.depth - 2) % 6 == 0, "6n+2 with n >= 1 (8, 14, 20, 32, ...)")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (the paper's Fig. 2, left)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.pad_channels = out_channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option A: subsample the identity and zero-pad the new channels (parameter-free)."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]  # (B, C_in, ceil(H/s), ceil(W/s)), same as conv1's output
        if self.pad_channels > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad_channels))  # (B, C_out, H', W')
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-(6n+2) for small images: stem, three stages of n BasicBlocks, global average pool, linear head."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        self.image_shape = as_image_shape(config)
        blocks_per_stage = (config.depth - 2) // 6
        widths = (config.width, 2 * config.width, 4 * config.width)
        self.stem = nn.Sequential(
            nn.Conv2d(self.image_shape[0], widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        in_channels = widths[0]
        for stage, out_channels in enumerate(widths):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride))
                in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_channels, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He et al. 2015 ("Delving deep into rectifiers") init, as the paper uses.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W), or any (B, ...) with C*H*W elements per sample -> logits (B, num_classes)."""
        x = x.float().reshape(x.shape[0], *self.image_shape)  # (B, C, H, W)
        x = self.blocks(self.stem(x))  # (B, 4*width, H/4, W/4)
        return self.head(x.mean(dim=(2, 3)))  # (B, num_classes)


@register_model("resnet20", ResNetConfig)
def build_resnet(config: ResNetConfig) -> ResNet:
    """Build a :class:`ResNet` from its config (depth 20 by default)."""
    return ResNet(config)
