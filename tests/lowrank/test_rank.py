import pytest
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.lowrank import LowRankConv2d, LowRankLinear, effective_rank, effective_ranks, factorize


def test_effective_rank_of_identity_is_n():
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0)


def test_effective_rank_of_rank_one_matrix_is_one():
    torch.manual_seed(0)
    w = torch.randn(6, 1) @ torch.randn(1, 4)
    assert effective_rank(w) == pytest.approx(1.0, abs=1e-5)


def test_effective_rank_of_two_equal_singular_values_is_two():
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))) == pytest.approx(2.0)


def test_effective_rank_is_between_one_and_rank_and_zero_for_zero_weight():
    w = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
    assert 1.0 < effective_rank(w) < 3.0
    assert effective_rank(torch.zeros(3, 3)) == 0.0


def test_conv_kernel_is_reshaped_to_out_by_rest():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3)
    assert effective_rank(conv) == pytest.approx(effective_rank(conv.weight.reshape(4, 27)))


def test_lowrank_module_is_measured_on_composed_weight():
    torch.manual_seed(2)
    lin = LowRankLinear(8, 8, 2)
    conv = LowRankConv2d(4, 8, 3, rank=3)
    assert effective_rank(lin) == pytest.approx(effective_rank(lin.inflate()))
    assert effective_rank(lin) <= 2 + 1e-6
    assert effective_rank(conv) <= 3 + 1e-6


def test_effective_ranks_lists_dense_and_lowrank_layers_once():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4), nn.Linear(4, 2))
    factorize(model, rank_ratio=1.0, layers=["3"])
    ranks = effective_ranks(model)
    assert set(ranks) == {"0", "3", "4"}
    assert ranks["3"] == pytest.approx(effective_rank(model[3].composed_weight()))


def test_bad_input_raises():
    with pytest.raises(ConfigError, match="at least 2 dimensions"):
        effective_rank(torch.ones(3))
    with pytest.raises(ConfigError, match="ReLU"):
        effective_rank(nn.ReLU())
