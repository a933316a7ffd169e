"""AsyncSAM (single-process mode): staleness 0 is SAM, staleness 1 perturbs with the previous step's ascent."""

import copy
import time

import pytest
import torch
from async_sam_steps import rows, train_steps
from torch import nn

from leantrain.errors import ConfigError, LeantrainError
from leantrain.optim import SAM
from leantrain.optim.ascent_worker import AscentProcessError
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


# ---------------------------------------------------------------- a separate ascent batch; the two-process mode


def _rows(n=96):
    return rows(n)


def _dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))


def _train(model, opt, rows, steps=5, batch=16):
    return train_steps(model, opt, rows, steps, batch)


def _ascent(rows, batch_size=12):
    from leantrain.optim import Ascent
    from leantrain.train import ClassificationTask

    return Ascent(ClassificationTask().loss, rows, batch_size=batch_size, seed=7)


def test_sequential_ascent_batch_step_by_hand():
    """With an Ascent, step t perturbs with ρ·g'/‖g'‖ where g' is taken at w_{t−1} on the ascent batch of t−1."""
    from leantrain.train import ClassificationTask

    rows, rho, lr = _rows(), 0.2, 0.1
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    ref = copy.deepcopy(model)
    ascent = _ascent(rows)
    _train(model, AsyncSAM(model.parameters(), rho=rho, lr=lr, model=model, ascent=ascent), rows, steps=2)

    task = ClassificationTask()

    def grads(m, batch):
        m.zero_grad()
        task.loss(m, batch)[0].backward()
        return [p.grad.clone() for p in m.parameters()]

    b0, b1 = ({k: v[i * 16 : (i + 1) * 16] for k, v in rows.items()} for i in range(2))
    ga = grads(ref, ascent.batch(0, 12))  # the ascent at w0 on the ascent batch of version 0
    g0 = grads(ref, b0)  # step 0: no perturbation yet
    with torch.no_grad():
        for p, g in zip(ref.parameters(), g0, strict=True):
            p.sub_(lr * g)
        w1 = [p.clone() for p in ref.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ga]))
        for p, g in zip(ref.parameters(), ga, strict=True):
            p.add_(rho * g / norm)
    g1 = grads(ref, b1)
    with torch.no_grad():
        for p, w, g in zip(ref.parameters(), w1, g1, strict=True):
            p.copy_(w - lr * g)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_ascent_pass_leaves_bn_statistics_and_rng_alone():
    rows = {"x": torch.randn(64, 4), "labels": torch.randint(0, 2, (64,))}
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    opt = AsyncSAM(model.parameters(), lr=0.1, model=model, ascent=_ascent(rows, 8))
    bn = model[1]
    before = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    torch.manual_seed(5)
    opt._ascent_in_process()
    after_rng = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after_rng, torch.rand(1))
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.num_batches_tracked, before[1])


def test_two_process_wait_matches_sequential_exactly():
    rows = _rows()
    a, b = _dropout_model(), _dropout_model()
    kw = {"rho": 0.1, "lr": 0.1, "momentum": 0.9}
    la = _train(a, AsyncSAM(a.parameters(), model=a, ascent=_ascent(rows), **kw), rows)
    with AsyncSAM(b.parameters(), model=b, ascent=_ascent(rows), mode="two_process", **kw) as opt:
        lb = _train(b, opt, rows)
        stats = opt.async_stats
    assert la == lb
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert stats["misses"] == 0 and stats["staleness"] == {1: 4} and stats["ascent_batch_size"] == {12: 4}
    assert opt._worker.process is None  # closed


def test_two_process_reuse_never_waits_for_a_slow_worker_and_counts_misses():
    rows = _rows(512)
    model = _dropout_model()
    with AsyncSAM(model.parameters(), lr=0.05, model=model, ascent=_ascent(rows, 512), mode="two_process",
                  on_miss="reuse", slowdown=50) as opt:  # fmt: skip
        _train(model, opt, rows, steps=20, batch=16)
        misses = opt.async_stats["misses"]
        deadline = time.monotonic() + 60
        while opt._worker.shared.ascent_version.value < 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # let the slow worker publish its first ascent, then use it
        _train(model, opt, rows, steps=2, batch=16)
        stats = opt.async_stats
    assert stats["steps"] == 22
    assert misses >= 1  # the 50x-slowed worker could not keep up; the steps went on without waiting
    assert any(age > 1 for age in stats["staleness"])  # and the late ascent was used, older than one step


def test_two_process_auto_batch_size_and_worker_failure():
    from leantrain.optim.ascent_worker import BatchSizeRule

    rule = BatchSizeRule(max_batch_size=64)
    assert rule.needs_profile(0.1) == 8
    for c, t in ((8, 0.01), (12, 0.015), (16, 0.02), (24, 0.03), (32, 0.04), (48, 0.06), (64, 0.2)):
        rule.observe(c, t)
    assert rule.needs_profile(0.1) is None
    assert rule.choose(0.1) == 48  # 0.06 <= 0.9 * 0.1 < 0.2
    assert rule.choose(0.001) == 8  # nothing fits: the smallest candidate
    assert rule.estimate(96) is None or rule.estimate(96) > 0

    def bad_loss(model, batch):  # not picklable is fine under fork; it fails inside the worker
        raise RuntimeError("boom in the ascent")

    from leantrain.optim import Ascent

    rows = _rows()
    model = _dropout_model()
    opt = AsyncSAM(model.parameters(), lr=0.1, model=model, ascent=Ascent(bad_loss, rows, batch_size=8),
                   mode="two_process")  # fmt: skip
    with pytest.raises(
        AscentProcessError, match="^AsyncSAM's ascent process failed: RuntimeError: boom in the ascent$"
    ) as err:
        _train(model, opt, rows, steps=3)
    assert err.value.details.startswith("Traceback") and "bad_loss" in err.value.details  # kept for the crash report
    assert opt._worker.process is None


def test_two_process_bad_input():
    rows = _rows()
    model = _model()
    with pytest.raises(ConfigError, match="needs ascent"):
        AsyncSAM(model.parameters(), lr=0.1, model=model, mode="two_process")
    with pytest.raises(ConfigError, match="staleness 1"):
        AsyncSAM(model.parameters(), lr=0.1, model=model, ascent=_ascent(rows), mode="two_process", staleness=2)
    with pytest.raises(ConfigError, match="needs model"):
        AsyncSAM(model.parameters(), lr=0.1, ascent=_ascent(rows))
    with pytest.raises(ConfigError, match="'auto'"):
        AsyncSAM(model.parameters(), lr=0.1, model=model, ascent=_ascent(rows, "auto"))
    with pytest.raises(ConfigError, match="on_miss"):
        AsyncSAM(model.parameters(), lr=0.1, on_miss="skip")
    with pytest.raises(ConfigError, match="not parameters of the given model"):
        AsyncSAM(_model().parameters(), lr=0.1, model=model, ascent=_ascent(rows), mode="two_process")
    from leantrain.optim import Ascent

    with pytest.raises(ConfigError, match="batch_size"):
        Ascent(lambda m, b: 0, rows, batch_size=0)
    with pytest.raises(ConfigError, match="first dimension"):
        Ascent(lambda m, b: 0, {"x": torch.zeros(3), "labels": torch.zeros(4)})


# ---------------------------------------------------------------- the explicit (two-call) form


def test_explicit_first_second_step_equals_closure_step():
    """Without an Ascent: backward at w, first_step, backward at w + ε, second_step == step(closure)."""
    kw = {"rho": 0.2, "staleness": 1, "lr": 0.05, "momentum": 0.9}
    batches = _batches(5)
    a, b = _model(), _model()
    _run(a, AsyncSAM(a.parameters(), **kw), batches)
    opt = AsyncSAM(b.parameters(), **kw)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(b(x), y).backward()
        opt.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_explicit_perturb_form_equals_closure_step_with_an_ascent():
    from leantrain.train import ClassificationTask

    rows = _rows()
    a, b = _dropout_model(), _dropout_model()
    kw = {"rho": 0.1, "lr": 0.1, "momentum": 0.9}
    _train(a, AsyncSAM(a.parameters(), model=a, ascent=_ascent(rows), **kw), rows)
    opt = AsyncSAM(b.parameters(), model=b, ascent=_ascent(rows), **kw)
    for i in range(5):
        batch = {k: v[i * 16 : (i + 1) * 16] for k, v in rows.items()}
        torch.manual_seed(100 + i)
        opt.perturb()
        opt.zero_grad()
        ClassificationTask().loss(b, batch)[0].backward()
        opt.step()  # no closure after perturb(): the second step
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(LeantrainError, match="perturb"):
        opt.first_step()
    with pytest.raises(LeantrainError, match="without perturb"):
        opt.second_step()


def test_grad_scaler_in_the_one_pass_mode_skips_overflow_and_restores_weights():
    from leantrain.train import ClassificationTask

    rows = _rows()
    model = _dropout_model().eval()
    opt = AsyncSAM(model.parameters(), lr=0.1, momentum=0.9, model=model, ascent=_ascent(rows), staleness=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batch = {k: v[:16] for k, v in rows.items()}
    before = [p.detach().clone() for p in model.parameters()]
    opt.perturb()
    opt.zero_grad()
    scaler.scale(ClassificationTask().loss(model, batch)[0]).backward()
    next(model.parameters()).grad[0, 0] = float("inf")  # an overflow in the only backward
    opt.second_step(grad_scaler=scaler)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))  # skipped, restored
    assert scaler.get_scale() == 2.0**9
    opt.perturb()
    opt.zero_grad()
    scaler.scale(ClassificationTask().loss(model, batch)[0]).backward()
    opt.second_step(grad_scaler=scaler)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))  # stepped
    with pytest.raises(ConfigError, match="grad_scaler"):
        AsyncSAM(model.parameters(), lr=0.1).first_step(grad_scaler=scaler)


def test_staleness_zero_is_sam_with_batchnorm_and_model():
    """With model=, both freeze the norm layers' statistics during the perturbed call: buffers equal too."""

    def bn_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).double()

    a, b = bn_model(), bn_model()
    kw = {"rho": 0.3, "lr": 0.1, "momentum": 0.9, "adaptive": True}
    la = _run(a, AsyncSAM(a.parameters(), staleness=0, model=a, **kw), _batches())
    lb = _run(b, SAM(b.parameters(), model=b, **kw), _batches())
    assert la == lb
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert int(a[1].num_batches_tracked) == 6  # one update per step: the unperturbed pass only
