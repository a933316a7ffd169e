import pytest
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.prune import prune_magnitude, remove_pruning, sparsity_report


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.55, 0.9])
def test_global_sparsity_is_exact_and_keeps_the_largest(sparsity):
    model = _mlp()
    dense = torch.cat([w.flatten() for w in _weights(model)]).clone()
    prune_magnitude(model, sparsity, scope="global")
    pruned = torch.cat([w.flatten() for w in _weights(model)])
    zero = pruned == 0
    assert int(zero.sum()) == round(sparsity * dense.numel())
    assert torch.equal(pruned[~zero], dense[~zero])  # kept weights are untouched
    if 0 < sparsity:
        assert dense[~zero].abs().min() >= dense[zero].abs().max()


def test_layer_scope_is_exact_per_layer():
    model = _mlp()
    dense = [w.clone() for w in _weights(model)]
    prune_magnitude(model, 0.7, scope="layer")
    for before, after in zip(dense, _weights(model), strict=True):
        zero = after == 0
        assert int(zero.sum()) == round(0.7 * before.numel())
        assert before[~zero].abs().min() >= before[zero].abs().max()


def test_ties_are_broken_by_lower_index_first():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].weight.fill_(-1.0)
    prune_magnitude(model, 0.4)  # round(0.4 * 10) = 4: the first four flat entries of layer 0
    assert model[0].weight.flatten().tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert (model[1].weight == -1.0).all()


def test_masks_stay_zero_through_training_and_after_remove():
    model = _mlp()
    prune_magnitude(model, 0.8)
    zeros = sparsity_report(model)["zeros"]
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert sparsity_report(model)["zeros"] == zeros

    assert remove_pruning(model) == ["0", "2", "4"]
    assert not hasattr(model[0], "weight_orig") and isinstance(model[0].weight, nn.Parameter)
    assert sparsity_report(model)["zeros"] == zeros


def test_reprune_at_higher_sparsity_keeps_old_mask_and_exact_count():
    model = _mlp()
    first = {n: m.clone() for n, m in prune_magnitude(model, 0.5).items()}
    second = prune_magnitude(model, 0.75)
    assert sparsity_report(model)["zeros"] == round(0.75 * sparsity_report(model)["numel"])
    for name, mask in first.items():
        assert bool((second[name][mask == 0] == 0).all())


def test_conv_layers_are_pruned_and_include_selects():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    prune_magnitude(model, 0.5, scope="layer", include=["0"])
    report = sparsity_report(model)
    assert report["layers"] == {"0": 0.5, "2": 0.0}
    prune_magnitude(model, 0.5, scope="layer", include=lambda name, m: isinstance(m, nn.Linear))
    assert sparsity_report(model)["layers"]["2"] == 0.5


def test_sparsity_report_numbers():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
        model[1].weight.copy_(torch.tensor([[3.0, 0.0]]))
        model[1].bias.zero_()  # biases are not counted
    assert sparsity_report(model) == {"layers": {"0": 0.5, "1": 0.5}, "global": 0.5, "zeros": 3, "numel": 6}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, r"sparsity=1.0 is invalid; it must be in \[0, 1\)"),
        ({"sparsity": -0.1}, "sparsity=-0.1"),
        ({"sparsity": True}, "sparsity=True"),
        ({"sparsity": 0.5, "scope": "row"}, "scope='row'"),
        ({"sparsity": 0.5, "include": ["nope"]}, "include='nope'"),
    ],
)
def test_bad_inputs_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        prune_magnitude(_mlp(), **kwargs)


def test_model_without_prunable_layers_raises():
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(4))
    with pytest.raises(ConfigError, match="no prunable layers"):
        prune_magnitude(model, 0.5)
    with pytest.raises(ConfigError, match="no prunable layers"):
        sparsity_report(model)
