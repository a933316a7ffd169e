import copy

import pytest
import torch
from torch import nn

from leantrain.errors import ConfigError, LeantrainError
from leantrain.optim.lwsam import LayerwiseSAM
from leantrain.optim.sam import SAM


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def _data(n=64, seed=1, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype) * scale
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return x, y


def _closure(model, opt, x, y, log=None):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if log is not None:
            log.append(
                {
                    n: (None if p.grad is None else p.grad.clone(), p.detach().clone())
                    for n, p in model.named_parameters()
                }
            )
        return loss

    return closure


def _layer_norms(model, x, y):
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    norms = [torch.sqrt(m.weight.grad.pow(2).sum() + m.bias.grad.pow(2).sum()).item() for m in linears]
    model.zero_grad(set_to_none=True)
    return norms


# ------------------------------------------------------------ layers and selection


def test_layers_are_modules_owning_parameters_in_order():
    opt = LayerwiseSAM(_mlp(), lr=0.1, num_layers=1)
    assert opt.layer_names == ["0", "2", "4"]
    assert [len(layer) for layer in opt.layers] == [2, 2, 2]


def test_selection_picks_the_layers_with_largest_gradient_norm():
    model, (x, y) = _mlp(), _data()
    norms = _layer_norms(model, x, y)
    expected = tuple(sorted(range(3), key=lambda i: -norms[i])[:2])
    opt = LayerwiseSAM(model, lr=0.1, num_layers=2)
    _closure(model, opt, x, y)()
    opt.first_step()
    assert opt.selection == expected
    assert opt.layer_norms == pytest.approx(norms, rel=1e-12)
    opt.second_step()


def test_only_chosen_layers_are_perturbed_and_norm_is_rho_over_them():
    model, (x, y) = _mlp(), _data()
    before = copy.deepcopy(model)
    opt = LayerwiseSAM(model, lr=0.1, rho=0.07, num_layers=1)
    log = []
    opt.step(_closure(model, opt, x, y, log))
    (chosen,) = opt.selection
    e_ws = []
    for i, layer in enumerate(opt.layers):
        for p in layer:
            if i == chosen:
                e_ws.append(opt.state[p]["e_w"])
            else:
                assert "e_w" not in opt.state[p]
    assert torch.linalg.vector_norm(torch.cat([e.flatten() for e in e_ws])).item() == pytest.approx(0.07, rel=1e-9)
    # during the perturbed pass (log[1]) the weights of the other layers are the original ones, the chosen ones moved
    for name, p0 in before.named_parameters():
        w_second = log[1][name][1]
        if name.startswith(opt.layer_names[chosen] + "."):
            assert not torch.equal(w_second, p0)
        else:
            assert torch.equal(w_second, p0)


def test_non_chosen_layers_step_with_the_first_gradient():
    model, (x, y) = _mlp(), _data()
    reference = copy.deepcopy(model)
    opt = LayerwiseSAM(model, lr=0.1, num_layers=1)
    log = []
    opt.step(_closure(model, opt, x, y, log))
    chosen_prefix = opt.layer_names[opt.selection[0]] + "."
    for (name, p), p0 in zip(model.named_parameters(), reference.parameters(), strict=True):
        g = log[0 if not name.startswith(chosen_prefix) else 1][name][0]
        torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * g, rtol=0, atol=1e-15)


def test_reselection_happens_exactly_every_reselect_every_steps():
    model, (x, y) = _mlp(), _data()
    opt = LayerwiseSAM(model, lr=0.5, num_layers=1, reselect_every=3)
    selected_at, norms = [], []
    for _ in range(8):
        opt.step(_closure(model, opt, x, y))
        selected_at.append(opt.selected_at)
        norms.append(list(opt.layer_norms))
    assert selected_at == [0, 0, 0, 3, 3, 3, 6, 6]
    assert norms[0] == norms[1] == norms[2] != norms[3] == norms[4] == norms[5] != norms[6]


def test_all_layers_chosen_matches_sam_exactly():
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    lw = LayerwiseSAM(m1, lr=0.1, momentum=0.9, weight_decay=1e-3, rho=0.05, num_layers=3)
    sam = SAM(m2.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, rho=0.05)
    for _ in range(5):
        l1 = lw.step(_closure(m1, lw, x, y))
        l2 = sam.step(_closure(m2, sam, x, y))
        assert torch.equal(l1, l2)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_two_call_form_matches_step_closure():
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    o1 = LayerwiseSAM(m1, lr=0.1, num_layers=2, alpha=0.5)
    o2 = LayerwiseSAM(m2, lr=0.1, num_layers=2, alpha=0.5)
    for _ in range(3):
        o1.step(_closure(m1, o1, x, y))
        _closure(m2, o2, x, y)()
        o2.first_step(zero_grad=True)
        nn.functional.cross_entropy(m2(x), y).backward()
        o2.second_step(zero_grad=True)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)
    assert all(p.requires_grad for p in m2.parameters())


def test_alpha_mixes_first_and_perturbed_gradients():
    model, (x, y) = _mlp(), _data()
    reference = copy.deepcopy(model)
    opt = LayerwiseSAM(model, lr=1.0, num_layers=1, alpha=0.25)
    log = []
    opt.step(_closure(model, opt, x, y, log))
    prefix = opt.layer_names[opt.selection[0]] + "."
    for (name, p), p0 in zip(model.named_parameters(), reference.parameters(), strict=True):
        if name.startswith(prefix):
            mixed = 0.75 * log[0][name][0] + 0.25 * log[1][name][0]
            torch.testing.assert_close(p.detach(), p0.detach() - mixed, rtol=0, atol=1e-12)


def test_weights_restored_bit_exactly_and_requires_grad_back():
    model, (x, y) = _mlp(), _data()
    opt = LayerwiseSAM(model, lr=0.0, num_layers=2)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.step(_closure(model, opt, x, y))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.requires_grad for p in model.parameters())


def test_failed_perturbed_pass_restores_weights_and_requires_grad():
    model, (x, y) = _mlp(), _data()
    opt = LayerwiseSAM(model, lr=0.1, num_layers=1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return _closure(model, opt, x, y)()

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------ the cheaper second pass


def test_second_pass_skips_layers_before_the_first_chosen_layer():
    model, (x, y) = _mlp(), _data(scale=1e-3)  # tiny inputs: the first layer's weight gradient is tiny
    opt = LayerwiseSAM(model, lr=0.1, num_layers=1)
    backward_calls = {name: 0 for name in opt.layer_names}  # gradients that reached each layer's output

    def count_on_backward(name):
        def forward_hook(module, inputs, out):
            if out.requires_grad:
                out.register_hook(lambda grad: backward_calls.__setitem__(name, backward_calls[name] + 1))

        return forward_hook

    for name in opt.layer_names:
        model.get_submodule(name).register_forward_hook(count_on_backward(name))
    log = []
    closure = _closure(model, opt, x, y, log)
    closure()
    assert all(v == 1 for v in backward_calls.values())
    opt.first_step()
    first = min(opt.selection)
    assert first > 0, "the test needs a chosen layer after the first one"
    closure()
    for i, name in enumerate(opt.layer_names):
        assert backward_calls[name] == (2 if i >= first else 1), name  # no backward through layers before w'
        for pname in ("weight", "bias"):
            assert (log[1][f"{name}.{pname}"][0] is None) == (i not in opt.selection)
    opt.second_step()
    assert all(p.grad is not None and p.requires_grad for p in model.parameters())


# ------------------------------------------------------------ checkpoints


def test_state_dict_resume_equals_uninterrupted():
    x, y = _data()
    kwargs = dict(lr=0.2, momentum=0.9, num_layers=1, reselect_every=3, alpha=0.5)
    straight = _mlp()
    opt = LayerwiseSAM(straight, **kwargs)
    for _ in range(9):
        opt.step(_closure(straight, opt, x, y))

    first = _mlp()
    opt1 = LayerwiseSAM(first, **kwargs)
    for _ in range(5):
        opt1.step(_closure(first, opt1, x, y))
    saved = copy.deepcopy({"model": first.state_dict(), "opt": opt1.state_dict()})
    assert saved["opt"]["lwsam"]["selection"] == list(opt1.selection)
    resumed = _mlp(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = LayerwiseSAM(resumed, **kwargs)
    opt2.load_state_dict(saved["opt"])
    assert opt2.selection == opt1.selection and opt2.step_count == 5
    for _ in range(4):
        opt2.step(_closure(resumed, opt2, x, y))
    for p1, p2 in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_state_dict_refuses_while_perturbed():
    model, (x, y) = _mlp(), _data()
    opt = LayerwiseSAM(model, lr=0.1, num_layers=1)
    _closure(model, opt, x, y)()
    opt.first_step()
    with pytest.raises(LeantrainError, match="perturbed"):
        opt.state_dict()
    opt.second_step()


# ------------------------------------------------------------ errors


@pytest.mark.parametrize("rho", [0.0, -0.1])
def test_non_positive_rho_raises(rho):
    with pytest.raises(ConfigError, match=rf"rho={rho!r}.*> 0"):
        LayerwiseSAM(_mlp(), lr=0.1, rho=rho, num_layers=1)


@pytest.mark.parametrize("k", [0, 4, 2.0])
def test_bad_num_layers_raises(k):
    with pytest.raises(ConfigError, match=rf"num_layers={k!r}.*\[1, 3\]"):
        LayerwiseSAM(_mlp(), lr=0.1, num_layers=k)


def test_bad_reselect_every_and_alpha_raise():
    with pytest.raises(ConfigError, match="reselect_every=0"):
        LayerwiseSAM(_mlp(), lr=0.1, num_layers=1, reselect_every=0)
    with pytest.raises(ConfigError, match=r"alpha=1.5.*\(0, 1\]"):
        LayerwiseSAM(_mlp(), lr=0.1, num_layers=1, alpha=1.5)
    with pytest.raises(ConfigError, match="selection='ema'"):
        LayerwiseSAM(_mlp(), lr=0.1, num_layers=1, selection="ema")


def test_step_without_closure_raises():
    opt = LayerwiseSAM(_mlp(), lr=0.1, num_layers=1)
    with pytest.raises(LeantrainError, match="closure"):
        opt.step()


def test_param_groups_are_layers():
    model = _mlp()
    groups = [{"params": list(model[0].parameters()) + list(model[2].parameters())}, {"params": model[4].parameters()}]
    opt = LayerwiseSAM(groups, lr=0.1, num_layers=1)
    assert opt.layer_names == ["group0", "group1"] and [len(layer) for layer in opt.layers] == [4, 2]


# ------------------------------------------------------------ convergence


def test_training_reduces_the_loss():
    model, (x, y) = _mlp(), _data()
    opt = LayerwiseSAM(model, lr=0.5, momentum=0.9, num_layers=1, reselect_every=5)
    first = opt.step(_closure(model, opt, x, y)).item()
    for _ in range(60):
        last = opt.step(_closure(model, opt, x, y)).item()
    assert last < 0.5 * first


# ------------------------------------------------------------ mixed precision


def _scaled_step(model, opt, x, y, scaler, inf_in_pass=None):
    for pass_ in (1, 2):
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if inf_in_pass == pass_:
            with_grad = [p for p in model.parameters() if p.grad is not None]  # pass 2: the chosen layer only
            with_grad[0].grad.view(-1)[0] = float("inf")
        if pass_ == 1:
            opt.first_step(zero_grad=True, grad_scaler=scaler)
    opt.second_step(zero_grad=True, grad_scaler=scaler)


def test_grad_scaler_step_equals_unscaled_step():
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    o1 = LayerwiseSAM(m1, lr=0.1, momentum=0.9, num_layers=1, alpha=0.5)
    o2 = LayerwiseSAM(m2, lr=0.1, momentum=0.9, num_layers=1, alpha=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(3):
        o1.step(_closure(m1, o1, x, y))
        _scaled_step(m2, o2, x, y, scaler)  # the kept g is unscaled once, the perturbed gradient once
        assert not o2.last_step_skipped and o2.selection == o1.selection
        assert o2.layer_norms == o1.layer_norms  # selection saw the unscaled gradient
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize("inf_in_pass", [1, 2])
def test_overflow_skips_the_step_and_restores_everything(inf_in_pass):
    x, y = _data()
    model = _mlp()
    opt = LayerwiseSAM(model, lr=0.1, momentum=0.9, num_layers=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _scaled_step(model, opt, x, y, scaler)
    weights = [p.detach().clone() for p in model.parameters()]
    base = copy.deepcopy(opt.base_optimizer.state_dict()["state"])
    selection, step_count = opt.selection, opt.step_count
    _scaled_step(model, opt, x, y, scaler, inf_in_pass=inf_in_pass)
    assert opt.last_step_skipped
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert all(p.requires_grad for p in model.parameters())
    assert not any("g" in opt.state[p] for p in model.parameters())  # no kept gradient left behind
    now = opt.base_optimizer.state_dict()["state"]
    assert all(torch.equal(now[i]["momentum_buffer"], s["momentum_buffer"]) for i, s in base.items())
    assert scaler.get_scale() == 2.0**11
    # a first-pass overflow selects nothing; a second-pass one had a finite first pass and counts as a step
    assert opt.step_count == step_count + (inf_in_pass == 2)
    if inf_in_pass == 1:
        assert opt.selection == selection
    _scaled_step(model, opt, x, y, scaler)
    assert not opt.last_step_skipped
