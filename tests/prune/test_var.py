import pytest
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.prune import VarianceAmplifyingRegularizer, prune_magnitude


def _two_layer() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.0]]))
        model[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
    return model


def test_penalty_equals_hand_computation():
    # layer 0: |w| = 1,2,3,0 -> E[w²] = 3.5, E|w| = 1.5, Var = 1.25; layer 2: |w| = 1,1 -> Var = 0
    reg = VarianceAmplifyingRegularizer(_two_layer(), lam=2.0, r=0.0, eps=0.25)
    assert reg.names == ["0.weight", "2.weight"]
    torch.testing.assert_close(reg.layer_terms(), torch.tensor([1 / 1.5, 4.0]))
    assert reg().item() == pytest.approx(2.0 * (1 / 1.5 + 4.0))


def test_biases_and_norms_are_excluded_by_default():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Embedding(5, 4))
    assert VarianceAmplifyingRegularizer(model, lam=1.0).names == ["0.weight"]


def test_gradient_matches_autograd_of_formula_and_closed_form():
    torch.manual_seed(0)
    lam, r, eps = 0.3, 1e-4, 1e-3
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    reg = VarianceAmplifyingRegularizer([w], lam=lam, r=r, eps=eps)
    (grad,) = torch.autograd.grad(reg(), w)

    w2 = w.detach().clone().requires_grad_(True)
    mag = (w2**2 + r) ** 0.5
    var = ((mag - mag.mean()) ** 2).mean()  # population variance, written independently
    (ref,) = torch.autograd.grad(lam / (var + eps), w2)
    torch.testing.assert_close(grad, ref)

    with torch.no_grad():
        wt = (w**2 + r).sqrt()
        v = wt.var(unbiased=False)
        closed = lam * -(2 / w.numel()) * (wt - wt.mean()) * (w / wt) / (v + eps) ** 2
    torch.testing.assert_close(grad, closed)


def test_descent_on_penalty_alone_increases_magnitude_variance():
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    reg = VarianceAmplifyingRegularizer(layer, lam=1e-3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.weight.detach().abs().var(unbiased=False).item()
    for _ in range(5):
        opt.zero_grad()
        reg().backward()
        opt.step()
    after = layer.weight.detach().abs().var(unbiased=False).item()
    assert after > 1.1 * before


def test_custom_filter_and_pruned_model_gradient_reaches_weight_orig():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    only_last = VarianceAmplifyingRegularizer(model, lam=1.0, param_filter=lambda n, p: n == "1.weight")
    assert only_last.names == ["1.weight"]

    reg = VarianceAmplifyingRegularizer(model, lam=1.0)
    prune_magnitude(model, 0.5)
    reg().backward()
    grad = model[0].weight_orig.grad
    assert grad is not None and bool((grad[model[0].weight_mask == 0] == 0).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lam": -1.0}, "lam=-1.0"),
        ({"lam": 1.0, "eps": -1.0}, "eps=-1.0"),
        ({"lam": 1.0, "variant": "v2"}, "variant='v2'"),
        ({"lam": 1.0, "param_filter": lambda n, p: False}, "no matching parameters"),
    ],
)
def test_bad_inputs_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        VarianceAmplifyingRegularizer(nn.Linear(3, 3), **kwargs)


def test_model_without_layers_raises():
    with pytest.raises(ConfigError, match="no matching parameters"):
        VarianceAmplifyingRegularizer(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)), lam=1.0)


def test_accumulate_grad_after_the_task_backward_on_a_pruned_model():
    """Regression: accumulate_grad() used to re-enter the graph of the weight computed by the last forward, which
    loss.backward() had freed ("backward through the graph a second time")."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        prune_magnitude(model, 0.5)
        models.append(model)
    two_calls, reference = models
    reg = VarianceAmplifyingRegularizer(two_calls, lam=0.01)
    nn.functional.cross_entropy(two_calls(x), y).backward()
    penalty = reg.accumulate_grad()  # the leantrain loop's form: after the task loss's backward
    ref_reg = VarianceAmplifyingRegularizer(reference, lam=0.01)
    (nn.functional.cross_entropy(reference(x), y) + ref_reg()).backward()
    torch.testing.assert_close(penalty, ref_reg().detach())
    for a, b in zip(two_calls.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    assert two_calls[0].weight_orig.grad[two_calls[0].weight_mask == 0].abs().sum() == 0  # masked: no gradient
