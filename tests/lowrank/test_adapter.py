import pytest
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.lowrank import LowRankAdapter


def _layers():
    torch.manual_seed(0)
    return [
        (nn.Linear(6, 5), torch.randn(3, 6)),
        (nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=1, bias=True), torch.randn(2, 3, 9, 9)),
        (nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False), torch.randn(2, 4, 7, 7)),
    ]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_zero_init_adapter_preserves_the_function_and_freezes_the_base(index):
    base, x = _layers()[index]
    ref = base(x).detach()
    adapted = LowRankAdapter(base, rank=2, alpha=16)
    torch.testing.assert_close(adapted(x), ref, atol=0, rtol=0)
    assert not any(p.requires_grad for p in adapted.base.parameters())
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {"down.weight", "up.weight"}
    assert adapted.scaling == 8.0


@pytest.mark.parametrize("index", [0, 1, 2])
def test_trained_adapter_merges_into_an_equal_dense_layer(index):
    base, x = _layers()[index]
    adapted = LowRankAdapter(base, rank=2, alpha=4)
    before = base.weight.detach().clone()
    opt = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        adapted(x).pow(2).mean().backward()
        opt.step()
    assert torch.equal(adapted.base.weight, before)  # frozen
    assert adapted.up.weight.abs().sum() > 0  # the adapter trained
    merged = adapted.merge()
    assert type(merged) is type(base) and merged.weight.requires_grad
    torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=1e-5)
    delta = adapted.up.weight.flatten(1) @ adapted.down.weight.flatten(1)
    torch.testing.assert_close(merged.weight, before + 2.0 * delta.reshape(before.shape))


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="rank"):
        LowRankAdapter(nn.Linear(4, 3), rank=4)
    with pytest.raises(ConfigError, match="alpha"):
        LowRankAdapter(nn.Linear(4, 3), rank=1, alpha=0)
    with pytest.raises(ConfigError, match="non-grouped"):
        LowRankAdapter(nn.Conv2d(4, 4, 3, groups=4), rank=1)
