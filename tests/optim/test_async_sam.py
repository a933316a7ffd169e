"""AsyncSAM (single-process mode): staleness 0 is SAM, staleness 1 perturbs with the previous step's ascent."""

import copy

import pytest
import torch
from torch import nn

from leantrain.errors import ConfigError, LeantrainError
from leantrain.optim import SAM
from leantrain.optim.async_sam import AsyncSAM


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def _run(model, opt, batches):
    losses = []
    for x, y in batches:

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses.append(opt.step(closure).item())
    return losses


def test_staleness_zero_is_sam():
    a, b = _model(), _model()
    kw = {"rho": 0.3, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    la = _run(a, AsyncSAM(a.parameters(), staleness=0, **kw), _batches())
    lb = _run(b, SAM(b.parameters(), **kw), _batches())
    assert la == lb
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_staleness_one_uses_the_previous_steps_ascent():
    model, rho, lr = _model(), 0.3, 0.1
    batches = _batches(2)
    ref = copy.deepcopy(model)
    _run(model, AsyncSAM(model.parameters(), rho=rho, staleness=1, lr=lr), batches)

    def grads(m, x, y):
        m.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        return [p.grad.clone() for p in m.parameters()]

    (x0, y0), (x1, y1) = batches
    g0 = grads(ref, x0, y0)  # step 1: no perturbation yet, a plain SGD step at w0
    eps = [rho * g / torch.linalg.vector_norm(torch.stack([h.norm() for h in g0])) for g in g0]
    with torch.no_grad():
        for p, g in zip(ref.parameters(), g0, strict=True):
            p.sub_(lr * g)
        w1 = [p.clone() for p in ref.parameters()]
        for p, e in zip(ref.parameters(), eps, strict=True):  # step 2: ε from (w0, B0), applied at w1
            p.add_(e)
    g1 = grads(ref, x1, y1)
    with torch.no_grad():
        for p, w, g in zip(ref.parameters(), w1, g1, strict=True):
            p.copy_(w - lr * g)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_state_dict_resume_is_identical():
    kw = {"rho": 0.2, "staleness": 2, "lr": 0.05, "momentum": 0.9}
    batches = _batches(7)
    straight = _model()
    _run(straight, AsyncSAM(straight.parameters(), **kw), batches)

    first = _model()
    opt = AsyncSAM(first.parameters(), **kw)
    _run(first, opt, batches[:3])
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(first.state_dict())
    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt2 = AsyncSAM(resumed.parameters(), **kw)
    opt2.load_state_dict(saved_opt)
    _run(resumed, opt2, batches[3:])
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters(), strict=True))


def test_bad_input():
    model = _model()
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="staleness"):
            AsyncSAM(model.parameters(), staleness=bad, lr=0.1)
    with pytest.raises(ConfigError, match="rho"):
        AsyncSAM(model.parameters(), rho=0.0, lr=0.1)
    with pytest.raises(LeantrainError, match="needs a closure"):
        AsyncSAM(model.parameters(), lr=0.1).step()


def test_trains_in_the_leantrain_loop():
    from leantrain.train import ClassificationTask, Trainer

    model = _model().float()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    batches = [{"x": x[i : i + 16], "labels": (x[i : i + 16, 0] > 0).long()} for i in range(0, 64, 16)]
    opt = AsyncSAM(model.parameters(), rho=0.05, lr=0.2, momentum=0.9)
    trainer = Trainer(model, opt, ClassificationTask(), batches, epochs=15)
    before = trainer.evaluate(batches)["loss"]
    trainer.fit()
    assert trainer.evaluate(batches)["loss"] < 0.5 * before
