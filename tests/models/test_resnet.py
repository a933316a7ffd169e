"""ResNet-(6n+2): the paper's parameter counts (option-A shortcuts add none) and depth validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.models import build_model


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth, paper_params", [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6)])
def test_parameter_count_matches_the_paper(depth, paper_params):
    # He et al. 2016, Table 6 (CIFAR-10, 3-channel input, 10 classes).
    model = build_model("resnet20", input_shape=(3, 32, 32), depth=depth)
    assert abs(_count(model) - paper_params) / paper_params < 0.02


def test_option_a_shortcuts_are_parameter_free():
    model = build_model("resnet20", input_shape=(3, 32, 32))
    kernels = {m.kernel_size for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert kernels == {(3, 3)}  # no 1x1 projection convs
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 19  # + 1 linear layer = 20


@pytest.mark.parametrize("depth", [0, 2, 19, 21, 110 + 1])
def test_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ConfigError, match=rf"ResNetConfig.depth={depth} .*6n\+2"):
        build_model("resnet20", depth=depth)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (28, 28), (1, 7, 5)])
def test_any_channel_count_and_image_size(shape):
    model = build_model("resnet20", input_shape=shape, num_classes=5, width=4).eval()
    x = torch.randn(2, *shape)
    assert model(x).shape == (2, 5)
    assert torch.equal(model(x.flatten(1)), model(x))  # flat inputs are reshaped to (C, H, W)
