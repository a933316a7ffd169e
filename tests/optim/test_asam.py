"""ASAM's operator T_w: the official rule (|w| + η on weights, identity on biases) by hand, davda54's form kept
bit-exact, the weight-vs-bias rule with and without names, and one operator shared by SAM and AsyncSAM."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import leantrain.optim.sam as sam_module
from leantrain.errors import ConfigError
from leantrain.optim import SAM, Ascent, AsyncSAM
from leantrain.optim.ascent_worker import ascent_vectors


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.LayerNorm(3), nn.Linear(3, 2)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)


def _functional_loss(w, x, y):
    """The model above written out: Linear, tanh, LayerNorm, Linear, mean squared error."""
    h = torch.tanh(x @ w["0.weight"].T + w["0.bias"])
    h = F.layer_norm(h, (3,), w["2.weight"], w["2.bias"])
    return ((h @ w["3.weight"].T + w["3.bias"] - y) ** 2).mean()


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    return closure


def test_official_rule_one_step_matches_the_hand_computation():
    """ε = ρ·T_w²g/‖T_w g‖ with T_w = |w| + η on every parameter named '...weight' (LayerNorm's gain included) and
    T_w = 1 on biases; then w − lr·∇L(w + ε). float64, to 1e-12."""
    model, (x, y) = _model(), _data()
    rho, eta, lr = 0.5, 0.01, 0.1
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=True, model=model, lr=lr)
    assert (opt.adaptive_form, opt.adaptive_eta) == ("official", 0.01)  # the defaults

    w = {n: t.clone().requires_grad_(True) for n, t in w0.items()}
    g = dict(zip(w, torch.autograd.grad(_functional_loss(w, x, y), list(w.values())), strict=True))
    t = {n: (w0[n].abs() + eta if "weight" in n else torch.ones_like(w0[n])) for n in w0}
    norm = torch.sqrt(sum(((t[n] * g[n]) ** 2).sum() for n in w0))
    eps = {n: rho * t[n] ** 2 * g[n] / norm for n in w0}
    assert torch.equal(t["0.bias"], torch.ones(3, dtype=torch.float64))  # biases: the identity (SAM's ε)

    loss = opt.step(_closure(model, opt, x, y))
    wp = {n: (w0[n] + eps[n]).requires_grad_(True) for n in w0}
    gp = torch.autograd.grad(_functional_loss(wp, x, y), list(wp.values()))
    for (n, p), gpn in zip(model.named_parameters(), gp, strict=True):
        torch.testing.assert_close(p.detach(), w0[n] - lr * gpn, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss.detach(), _functional_loss(w0, x, y), rtol=0, atol=1e-12)

    model2 = _model()  # first_step alone: the stored ε itself against the hand ε
    opt2 = SAM(model2.parameters(), torch.optim.SGD, rho=rho, adaptive=True, model=model2, lr=lr)
    ((model2(x) - y) ** 2).mean().backward()
    opt2.first_step()
    for n, p in model2.named_parameters():
        torch.testing.assert_close(opt2.state[p]["e_w"], eps[n], rtol=0, atol=1e-12)


def test_eta_enters_t_w_and_through_it_the_norm():
    model, (x, y) = _model(), _data()
    ((model(x) - y) ** 2).mean().backward()
    w = model[0].weight
    for eta in (0.0, 0.01, 0.5):
        opt = SAM(model.parameters(), adaptive=True, adaptive_eta=eta, model=model, lr=0.1)
        vecs, norm = sam_module.ascent_direction(list(model.parameters()), opt.asam_etas())
        torch.testing.assert_close(vecs[0], (w.abs() + eta) ** 2 * w.grad, rtol=0, atol=1e-15)
        assert vecs[1] is model[0].bias.grad  # the identity: the gradient itself
        expected = torch.sqrt(sum(((sam_module.asam_t_w(p, e) if e is not None else 1) * p.grad).pow(2).sum()
                                  for p, e in zip(model.parameters(), opt.asam_etas(), strict=True)))  # fmt: skip
        torch.testing.assert_close(norm, expected, rtol=1e-14, atol=0)


def test_weight_or_bias_by_name_else_by_shape():
    model = _model()
    named = SAM(model.parameters(), adaptive=True, model=model, lr=0.1)
    assert named.asam_etas() == [0.01, None, 0.01, None, 0.01, None]  # LayerNorm's gain '2.weight' is a weight
    from_param_names = SAM(model.named_parameters(), adaptive=True, lr=0.1)  # torch's named parameters
    assert from_param_names.asam_etas() == named.asam_etas()
    by_shape = SAM(model.parameters(), adaptive=True, lr=0.1)  # no names: ≥ 2 dims is a weight
    assert by_shape.asam_etas() == [0.01, None, None, None, 0.01, None]  # the 1-D LayerNorm gain: identity
    davda = SAM(model.parameters(), adaptive=True, adaptive_form="davda54", lr=0.1)
    assert davda.asam_etas() == [0.0] * 6
    mixed = SAM([{"params": model[0].parameters(), "adaptive": False}, {"params": model[3].parameters()}],
                adaptive=True, model=model, lr=0.1)  # fmt: skip
    assert mixed.asam_etas() == [None, None, 0.01, None]
    assert SAM(model.parameters(), model=model, lr=0.1).asam_etas() == [None] * 6  # SAM: no operator at all


def test_named_params_and_model_give_the_same_step():
    (x, y), rho = _data(), 0.5
    a, b = _model(), _model()
    opt_a = SAM(a.parameters(), rho=rho, adaptive=True, model=a, lr=0.1, momentum=0.9)
    opt_b = SAM(b.named_parameters(), rho=rho, adaptive=True, lr=0.1, momentum=0.9)
    for _ in range(3):
        opt_a.step(_closure(a, opt_a, x, y))
        opt_b.step(_closure(b, opt_b, x, y))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _old_davda54_step(model, base, x, y, rho):
    """leantrain's ASAM before the official form (davda54/sam's): T_w = |w| on every parameter."""
    base.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    params = list(model.parameters())
    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack([(p.abs() * p.grad).norm(p=2) for p in params]), ord=2)
        scale = rho / (norm + 1e-12)
        old = [p.detach().clone() for p in params]
        eps = [(p * p * p.grad) * scale for p in params]
        for p, e in zip(params, eps, strict=True):
            p.add_(e)
    base.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    with torch.no_grad():
        for p, o in zip(params, old, strict=True):
            p.copy_(o)
    base.step()
    return eps


def test_davda54_form_reproduces_the_old_rule_bit_for_bit():
    (x, y), rho = _data(), 0.5
    a, b = _model(), _model()
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    opt = SAM(a.parameters(), rho=rho, adaptive=True, adaptive_form="davda54", adaptive_eta=0.3, model=a, **kw)
    base = torch.optim.SGD(b.parameters(), **kw)  # η (0.3 above) plays no part in this form
    for _ in range(4):
        opt.step(_closure(a, opt, x, y))
        _old_davda54_step(b, base, x, y, rho)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = _model()
    opt_c = SAM(c.parameters(), rho=rho, adaptive=True, adaptive_form="davda54", lr=0.1)
    ((c(x) - y) ** 2).mean().backward()
    opt_c.first_step()
    eps = _old_davda54_step(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), x, y, rho)
    assert all(torch.equal(opt_c.state[p]["e_w"], e) for p, e in zip(c.parameters(), eps, strict=True))


def test_the_old_hand_computed_asam_test_under_davda54():
    """tests/optim/test_sam.py's ASAM check (T_w = |w| on an unnamed vector) holds with adaptive_form='davda54'."""
    g = torch.Generator().manual_seed(3)
    m = torch.randn(5, 5, generator=g, dtype=torch.float64)
    a, w0 = m @ m.T + torch.eye(5, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    lr, rho = 0.05, 0.5
    w = w0.clone().requires_grad_(True)
    opt = SAM([w], torch.optim.SGD, rho=rho, adaptive=True, adaptive_form="davda54", lr=lr)

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ a @ w
        loss.backward()
        return loss

    opt.step(closure)
    grad, t = a @ w0, w0.abs()
    expected = w0 - lr * (a @ (w0 + rho * t * t * grad / (t * grad).norm()))
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)


def test_bad_adaptive_options():
    params = list(_model().parameters())
    for bad in ("samsung", None, "DAVDA54"):
        with pytest.raises(ConfigError, match="adaptive_form"):
            SAM(params, adaptive=True, adaptive_form=bad, lr=0.1)
    for bad in (-0.1, float("nan"), float("inf"), True, "0.01"):
        with pytest.raises(ConfigError, match="adaptive_eta"):
            SAM(params, adaptive=True, adaptive_eta=bad, lr=0.1)
    with pytest.raises(ConfigError, match="adaptive_form"):
        AsyncSAM(params, adaptive=True, adaptive_form="x", lr=0.1)


# ---------------------------------------------------------------- AsyncSAM: the same operator


@pytest.mark.parametrize("form", ["official", "davda54"])
def test_asyncsam_staleness_zero_is_asam(form):
    (x, y), kw = _data(), {"rho": 0.5, "adaptive": True, "adaptive_form": form, "lr": 0.1, "momentum": 0.9}
    a, b = _model(), _model()
    opt_a = AsyncSAM(a.parameters(), staleness=0, model=a, **kw)
    opt_b = SAM(b.parameters(), model=b, **kw)
    for _ in range(5):
        la = opt_a.step(_closure(a, opt_a, x, y))
        lb = opt_b.step(_closure(b, opt_b, x, y))
        assert torch.equal(la, lb)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_sam_and_the_ascent_vectors_go_through_one_operator(monkeypatch):
    """Replacing :func:`asam_t_w` changes SAM's ε and AsyncSAM's ascent vectors alike: T_w is defined once."""
    model, (x, y) = _model(), _data()
    monkeypatch.setattr(sam_module, "asam_t_w", lambda p, eta: None if eta is None else torch.full_like(p, 2.0))
    ((model(x) - y) ** 2).mean().backward()
    params = list(model.parameters())
    opt = AsyncSAM(params, rho=0.5, adaptive=True, model=model, lr=0.1)
    vecs, norm = ascent_vectors(params, opt.asam_etas())
    for p, v, eta in zip(params, vecs, opt.asam_etas(), strict=True):
        torch.testing.assert_close(v, p.grad * (4.0 if eta is not None else 1.0), rtol=0, atol=0)
        assert v is not p.grad  # the queued vectors are copies
    expected = torch.sqrt(sum(((2.0 if e is not None else 1.0) * p.grad).pow(2).sum()
                              for p, e in zip(params, opt.asam_etas(), strict=True)))  # fmt: skip
    torch.testing.assert_close(norm, expected, rtol=1e-14, atol=0)
    sam = SAM(params, rho=0.5, adaptive=True, model=model, lr=0.1)
    sam.first_step()
    for p, v in zip(params, vecs, strict=True):
        assert torch.equal(sam.state[p]["e_w"], v * (0.5 / (norm + 1e-12)))


def _rows(n=96):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return {"x": x, "y": torch.randn(n, 2, generator=g, dtype=torch.float64)}


def _mse(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def _train_with_ascent(model, opt, rows, steps=4, batch=16):
    for i in range(steps):
        b = {k: v[i * batch : (i + 1) * batch] for k, v in rows.items()}

        def closure(b=b):
            opt.zero_grad()
            loss = _mse(model, b)
            loss.backward()
            return loss

        opt.step(closure)


def test_asyncsam_worker_applies_the_same_operator():
    """Two processes (the worker computes ASAM's vectors with the η it was given) equal the in-process sequential
    mode with the same Ascent, bit for bit, and both differ from SAM's operator (adaptive=False)."""
    rows = _rows()
    kw = {"rho": 0.5, "adaptive": True, "lr": 0.1, "momentum": 0.9}
    a, b, c = _model(), _model(), _model()
    _train_with_ascent(a, AsyncSAM(a.parameters(), model=a, ascent=Ascent(_mse, rows, batch_size=12), **kw), rows)
    with AsyncSAM(b.parameters(), model=b, ascent=Ascent(_mse, rows, batch_size=12), mode="two_process",
                  **kw) as opt:  # fmt: skip
        _train_with_ascent(b, opt, rows)
        assert opt.async_stats["misses"] == 0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    kw["adaptive"] = False
    _train_with_ascent(c, AsyncSAM(c.parameters(), model=c, ascent=Ascent(_mse, rows, batch_size=12), **kw), rows)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_checkpoint_keeps_the_operator_choice_with_the_optimizer():
    """adaptive_form / adaptive_eta are constructor choices, like base_optimizer: a resumed SAM built with the same
    arguments continues identically."""
    (x, y), kw = _data(), {"rho": 0.5, "adaptive": True, "adaptive_eta": 0.05, "lr": 0.1, "momentum": 0.9}
    straight = _model()
    opt = SAM(straight.parameters(), model=straight, **kw)
    for _ in range(4):
        opt.step(_closure(straight, opt, x, y))
    first = _model()
    opt1 = SAM(first.parameters(), model=first, **kw)
    for _ in range(2):
        opt1.step(_closure(first, opt1, x, y))
    resumed = copy.deepcopy(first)
    opt2 = SAM(resumed.parameters(), model=resumed, **kw)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    for _ in range(2):
        opt2.step(_closure(resumed, opt2, x, y))
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters(), strict=True))
