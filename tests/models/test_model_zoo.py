"""timm-style sweep over the registry: every from-scratch model builds small, has the right output shape,
gets finite gradients on every parameter, and learns a fixed tiny batch in a few SGD steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from leantrain.models import build_model, list_models

PRETRAINED = {"minilm", "smollm2-135m"}
B = 8

# name -> (small config, input factory); every small model has 4 classes or a vocabulary of 20
SMALL = {
    "mlp": (
        {"input_shape": (1, 8, 8), "num_classes": 4, "hidden_sizes": (16,)},
        lambda g: torch.randn(B, 1, 8, 8, generator=g),
    ),
    "cnn": (
        {"input_shape": (1, 8, 8), "num_classes": 4, "channels": (4, 8), "hidden": 16},
        lambda g: torch.randn(B, 1, 8, 8, generator=g),
    ),
    "resnet20": (
        {"input_shape": (3, 8, 8), "num_classes": 4, "depth": 8, "width": 4},
        lambda g: torch.randn(B, 3, 8, 8, generator=g),
    ),
    "lstm": (
        {"vocab_size": 20, "num_classes": 4, "embed_dim": 8, "hidden_size": 8},
        lambda g: torch.randint(1, 20, (B, 6), generator=g),
    ),
    "tinygpt": (
        {"vocab_size": 20, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16},
        lambda g: torch.randint(0, 20, (B, 12), generator=g),
    ),
}


def test_every_registered_model_is_covered():
    assert set(list_models()) == set(SMALL) | PRETRAINED


def _batch(name):
    g = torch.Generator().manual_seed(0)
    config, make_input = SMALL[name]
    x = make_input(g)
    if name == "tinygpt":
        return x[:, :-1], x[:, 1:]  # next-token prediction
    return x, torch.randint(0, config["num_classes"], (B,), generator=g)


def _loss(name, model, x, y):
    logits = model(x)
    if name == "tinygpt":
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return F.cross_entropy(logits, y)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_shape(name):
    torch.manual_seed(0)
    model = build_model(name, **SMALL[name][0])
    x, _ = _batch(name)
    expected = (B, x.shape[1], 20) if name == "tinygpt" else (B, 4)
    assert model(x).shape == expected


@pytest.mark.parametrize("name", sorted(SMALL))
def test_backward_gives_finite_grads_on_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name, **SMALL[name][0])
    _loss(name, model, *_batch(name)).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has a non-finite gradient"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_few_sgd_steps_reduce_the_loss(name):
    torch.manual_seed(0)
    model = build_model(name, **SMALL[name][0])
    x, y = _batch(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = _loss(name, model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], f"{name}: {losses}"
