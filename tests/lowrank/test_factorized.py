import math

import pytest
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.lowrank import LowRankConv2d, LowRankLinear, densify, factorize


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: never factorized
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )


def test_full_rank_factorize_then_densify_reproduces_linear_outputs():
    model = _mlp()
    x = torch.randn(4, 6)
    ref = model(x)
    names = factorize(model, rank_ratio=1.0, layers=["0", "2"])
    assert names == ["0", "2"]
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], LowRankLinear)
    assert model[2].rank == 3  # min(out, in) caps the formula rank
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
    assert densify(model) == ["0", "2"]
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)


def test_full_rank_factorize_then_densify_reproduces_conv_outputs():
    model = _cnn()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    names = factorize(model, rank_ratio=1.0, layers=lambda name, m: isinstance(m, nn.Conv2d))
    assert names == ["0", "2"]  # the depthwise conv "3" is skipped
    assert model[0].down.stride == (2, 2) and model[0].up.bias is not None and model[2].up.bias is None
    assert model[0].up.kernel_size == (1, 1)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
    densify(model)
    assert type(model[0]) is nn.Conv2d and model[0].stride == (2, 2) and model[2].dilation == (2, 2)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("conv", [False, True])
def test_truncated_factorization_is_best_rank_r_approximation(conv):
    torch.manual_seed(1)
    dense = nn.Conv2d(4, 6, 3) if conv else nn.Linear(9, 7)
    rank = 2
    lr = (LowRankConv2d if conv else LowRankLinear).from_dense(dense, rank)
    w = dense.weight.detach().flatten(1).double()
    s = torch.linalg.svdvals(w)
    err = (lr.composed_weight().detach().flatten(1).double() - w).norm()
    assert err.item() == pytest.approx(s[rank:].pow(2).sum().sqrt().item(), rel=1e-5)
    assert torch.linalg.matrix_rank(lr.composed_weight().detach().flatten(1)).item() == rank


def test_inflate_gives_same_outputs():
    torch.manual_seed(2)
    lin = LowRankLinear(5, 7, 3)
    x = torch.randn(4, 5)
    torch.testing.assert_close(lin.inflate()(x), lin(x), atol=1e-5, rtol=0)
    conv = LowRankConv2d(3, 6, 3, rank=2, stride=2, padding=1, bias=True)
    xc = torch.randn(2, 3, 7, 7)
    dense = conv.inflate()
    assert dense.weight.shape == (6, 3, 3, 3)
    torch.testing.assert_close(dense(xc), conv(xc), atol=1e-5, rtol=0)


def test_default_factorize_picks_only_layers_where_rank_is_below_full():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.Conv2d(16, 4, 1), nn.Conv2d(4, 8, 3))
    # rank 8 >= min(16, 2) for "0"; rank 8 < 16 for "2"; rank 2 < 4 for "3"; rank 4 < min(8, 36) for "4"
    assert factorize(model, rank_ratio=0.5) == ["2", "3", "4"]
    assert type(model[0]) is nn.Linear
    assert (model[2].rank, model[3].rank, model[4].rank) == (8, 2, 4)


def test_factorize_replaces_only_chosen_layers_and_model_trains():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    head = model[4]
    assert factorize(model, rank_ratio=0.25, layers=["2"]) == ["2"]
    assert isinstance(model[2], LowRankLinear) and model[2].rank == 4
    assert type(model[0]) is nn.Linear and model[4] is head
    x, y = torch.randn(32, 16), torch.randint(0, 2, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = nn.functional.cross_entropy(model(x), y)
    before.backward()
    assert model[2].down.weight.grad is not None and model[2].up.weight.grad is not None
    opt.step()
    assert nn.functional.cross_entropy(model(x), y).item() < before.item()


def test_factorize_never_touches_factors_inside_lowrank_modules():
    model = _mlp()
    factorize(model, rank_ratio=1.0, layers=["0"])
    assert factorize(model, rank_ratio=0.5) == ["2"]
    with pytest.raises(ConfigError, match="0.down"):
        factorize(model, rank_ratio=1.0, layers=["0.down"])


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, True, "0.5", math.nan])
def test_bad_rank_ratio_raises(ratio):
    with pytest.raises(ConfigError, match="rank_ratio"):
        factorize(_mlp(), rank_ratio=ratio)


def test_bad_layers_and_nothing_to_factorize_raise():
    with pytest.raises(ConfigError, match="nope"):
        factorize(_mlp(), layers=["0", "nope"])
    with pytest.raises(ConfigError, match="3"):
        factorize(_cnn(), layers=["3"])  # depthwise
    with pytest.raises(ConfigError, match="nothing to factorize"):
        factorize(nn.Sequential(nn.Linear(4, 2)), rank_ratio=1.0)
    with pytest.raises(ConfigError, match="nothing to factorize"):
        factorize(_mlp(), layers=lambda name, m: False)


def test_bad_rank_and_module_type_raise():
    with pytest.raises(ConfigError, match=r"rank=0 .*\[1, 4\]"):
        LowRankLinear(4, 6, 0)
    with pytest.raises(ConfigError, match="rank=5"):
        LowRankLinear.from_dense(nn.Linear(4, 6), 5)
    with pytest.raises(ConfigError, match="nn.Conv2d"):
        LowRankConv2d.from_dense(nn.Linear(4, 6), 2)
    with pytest.raises(ConfigError, match="groups"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), 2)
