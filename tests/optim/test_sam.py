import contextlib
import io

import pytest
import torch
from torch import nn

from leantrain.errors import ConfigError, LeantrainError
from leantrain.optim import SAM, bn_stats_frozen
from leantrain.train import ClassificationTask, Trainer
from leantrain.train.checkpoint import pack_state, unpack_state


def _quadratic(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = m @ m.T + torch.eye(n, dtype=torch.float64)  # symmetric positive definite
    w0 = torch.randn(n, generator=g, dtype=torch.float64)
    return a, w0


def _quadratic_closure(a, w):
    def closure():
        w.grad = None
        loss = 0.5 * w @ a @ w
        loss.backward()
        return loss

    return closure


def _mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.ReLU(), nn.Linear(16, 2)]
    return nn.Sequential(*layers)


def _data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


def _model_closure(model, opt, x, y):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


# ------------------------------------------------------------ the update rule


def test_one_step_matches_hand_computed_sam_on_quadratic():
    a, w0 = _quadratic()
    lr, rho = 0.1, 0.3
    w = w0.clone().requires_grad_(True)
    opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr)
    loss = opt.step(_quadratic_closure(a, w))

    g = a @ w0  # ∇L(w0)
    eps = rho * g / g.norm()
    expected = w0 - lr * (a @ (w0 + eps))  # w − η∇L(w + ρg/‖g‖)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.detach(), 0.5 * w0 @ a @ w0)  # step returns the loss at w, not at w + ε
    # SAM is not plain SGD here
    assert not torch.allclose(w.detach(), w0 - lr * g)


def test_adaptive_step_matches_hand_computed_asam():
    a, w0 = _quadratic(seed=3)
    lr, rho = 0.05, 0.5
    w = w0.clone().requires_grad_(True)
    opt = SAM([w], torch.optim.SGD, rho=rho, adaptive=True, adaptive_form="davda54", lr=lr)
    opt.step(_quadratic_closure(a, w))

    g = a @ w0
    t = w0.abs()  # T_w = |w| (davda54's form; the official form is tested in test_asam.py)
    eps = rho * t * t * g / (t * g).norm()  # ε = ρ T_w² g / ‖T_w g‖
    expected = w0 - lr * (a @ (w0 + eps))
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)


def test_first_step_perturbation_has_norm_rho_over_all_groups():
    a, w0 = _quadratic(n=6)
    w1 = w0[:3].clone().requires_grad_(True)
    w2 = w0[3:].clone().requires_grad_(True)
    opt = SAM([{"params": [w1]}, {"params": [w2]}], torch.optim.SGD, rho=0.2, lr=0.1)
    loss = 0.5 * torch.cat([w1, w2]) @ a @ torch.cat([w1, w2])
    loss.backward()
    opt.first_step()
    eps = torch.cat([opt.state[w1]["e_w"], opt.state[w2]["e_w"]])
    g = a @ w0
    torch.testing.assert_close(eps, 0.2 * g / g.norm())  # one global norm, not one per group
    torch.testing.assert_close(torch.cat([w1, w2]).detach(), w0 + eps)


def test_per_group_rho_is_respected():
    a, w0 = _quadratic(n=6)
    w1 = w0[:3].clone().requires_grad_(True)
    w2 = w0[3:].clone().requires_grad_(True)
    lr = 0.1
    opt = SAM([{"params": [w1], "rho": 0.5}, {"params": [w2]}], torch.optim.SGD, rho=0.05, lr=lr)
    assert [group["rho"] for group in opt.param_groups] == [0.5, 0.05]

    def closure():
        opt.zero_grad()
        loss = 0.5 * torch.cat([w1, w2]) @ a @ torch.cat([w1, w2])
        loss.backward()
        return loss

    opt.step(closure)
    g = a @ w0
    eps = torch.cat([0.5 * g[:3], 0.05 * g[3:]]) / g.norm()
    expected = w0 - lr * (a @ (w0 + eps))
    torch.testing.assert_close(torch.cat([w1, w2]).detach(), expected, rtol=1e-12, atol=1e-12)


def test_second_step_restores_original_weights_bit_exactly():
    model = _mlp()
    x, y = _data()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.7, lr=0.0)
    closure = _model_closure(model, opt, x, y)
    closure()
    opt.first_step(zero_grad=True)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))  # really perturbed
    closure()
    opt.second_step(zero_grad=True)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_params_without_grad_are_skipped():
    model = _mlp()
    frozen = model[0].bias
    x, y = _data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        frozen.grad = None
        return loss

    before = frozen.detach().clone()
    opt.step(closure)
    assert torch.equal(frozen, before)
    assert "old_p" not in opt.state.get(frozen, {})


# ------------------------------------------------------------ BatchNorm


def test_bn_stats_frozen_keeps_running_stats_of_the_first_pass():
    x, y = _data()

    def run(freeze):
        model = _mlp(bn=True)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
        closure = _model_closure(model, opt, x, y)
        closure()
        bn = model[1]
        after_first = {k: v.clone() for k, v in bn.state_dict().items() if k.startswith(("running", "num"))}
        opt.first_step(zero_grad=True)
        with bn_stats_frozen(model) if freeze else contextlib.nullcontext():
            closure()
        opt.second_step(zero_grad=True)
        return after_first, bn

    after_first, bn = run(freeze=True)
    for name, value in after_first.items():
        assert torch.equal(getattr(bn, name), value), name
    after_first, bn = run(freeze=False)
    assert not torch.equal(bn.running_mean, after_first["running_mean"])
    assert bn.num_batches_tracked.item() == 2


def test_bn_stats_frozen_restores_cumulative_average_mode():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4, momentum=None)  # cumulative averaging, where momentum=0 tricks break
    bn(torch.randn(8, 4))
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    with bn_stats_frozen(bn):
        bn(torch.randn(8, 4) + 3.0)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert torch.equal(bn.num_batches_tracked, count)


# ------------------------------------------------------------ checkpoints


def _train(model, opt, batches):
    for x, y in batches:
        opt.step(_model_closure(model, opt, x, y))


def _make(model):
    return SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, weight_decay=1e-3)


def test_state_dict_round_trip_resumes_identically():
    x, y = _data(n=96)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 96, 16)]

    straight = _mlp(seed=2)
    _train(straight, _make(straight), batches)

    first = _mlp(seed=2)
    opt = _make(first)
    _train(first, opt, batches[:3])
    # through torch.save and through leantrain's safetensors/JSON packing
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    tensors: dict[str, torch.Tensor] = {}
    packed = pack_state(saved["opt"], tensors)

    resumed = _mlp(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = _make(resumed)
    opt2.load_state_dict(unpack_state(packed, tensors))
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.base_optimizer.state  # momentum buffers came back
    _train(resumed, opt2, batches[3:])

    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_refuses_while_perturbed():
    model = _mlp()
    x, y = _data()
    opt = _make(model)
    _model_closure(model, opt, x, y)()
    opt.first_step()
    with pytest.raises(LeantrainError, match="perturbed"):
        opt.state_dict()


# ------------------------------------------------------------ user errors


def test_step_without_closure_raises():
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(LeantrainError, match="closure"):
        opt.step()


@pytest.mark.parametrize("rho", [0.0, -0.1])
def test_non_positive_rho_raises(rho):
    model = _mlp()
    with pytest.raises(ConfigError, match=rf"rho={rho}"):
        SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1)
    with pytest.raises(ConfigError, match=r"param_groups\[0\]\.rho"):
        SAM([{"params": model.parameters(), "rho": rho}], torch.optim.SGD, lr=0.1)


# ------------------------------------------------------------ leantrain's loop


def test_trainer_with_sam_reduces_the_loss():
    x, y = _data(n=128)
    batches = [{"x": x[i : i + 16], "labels": y[i : i + 16]} for i in range(0, 128, 16)]
    model = _mlp(seed=3)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.2, momentum=0.9)
    trainer = Trainer(model, opt, ClassificationTask(), batches, epochs=8, log_every=1000)
    before = trainer.evaluate(batches)["loss"]
    trainer.fit()
    after = trainer.evaluate(batches)["loss"]
    assert trainer.state.step == 64
    assert after < 0.5 * before


# ------------------------------------------------------------ mixed precision


def _scaler(scale=2.0**10, growth_interval=2000):
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=growth_interval)


def _overflow(model):
    model[0].weight.grad[0, 0] = float("inf")  # what an fp16 overflow leaves in a gradient


def _scaled_sam_step(model, opt, x, y, scaler, inf_in_pass=None):
    """The F-SAM recipe: scale + backward, first_step (unscales), scale + backward, second_step (unscales, steps)."""
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    if inf_in_pass == 1:
        _overflow(model)
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    if inf_in_pass == 2:
        _overflow(model)
    opt.second_step(zero_grad=True, grad_scaler=scaler)


def _snapshot(model, opt):
    weights = [p.detach().clone() for p in model.parameters()]
    base = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.base_optimizer.state_dict()["state"].items()}
    return weights, base


def _assert_unchanged(model, opt, snapshot):
    weights, base = snapshot
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    now = opt.base_optimizer.state_dict()["state"]
    assert now.keys() == base.keys()
    assert all(torch.equal(now[i][k], v) for i, s in base.items() for k, v in s.items())


def test_grad_scaler_step_equals_unscaled_step_and_grows_the_scale():
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    o1, o2 = _make(m1), _make(m2)
    scaler = _scaler(growth_interval=1)  # every clean step doubles the scale
    for step in range(3):
        _model_closure(m1, o1, x, y)()
        o1.first_step(zero_grad=True)
        _model_closure(m1, o1, x, y)()
        o1.second_step(zero_grad=True)
        _scaled_sam_step(m2, o2, x, y, scaler)  # no "unscale_() has already been called" on any step
        assert not o2.last_step_skipped
        assert scaler.get_scale() == 2.0 ** (11 + step)  # update() saw both passes finite
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)  # power-of-two scaling is exact


@pytest.mark.parametrize("inf_in_pass", [1, 2])
def test_overflow_in_either_pass_skips_the_whole_step(inf_in_pass):
    x, y = _data()
    model = _mlp()
    opt = _make(model)
    scaler = _scaler()
    _scaled_sam_step(model, opt, x, y, scaler)  # momentum buffers now exist
    before = _snapshot(model, opt)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    if inf_in_pass == 1:
        _overflow(model)
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    perturbed = not all(torch.equal(p, w) for p, w in zip(model.parameters(), before[0], strict=True))
    assert perturbed == (inf_in_pass == 2)  # an overflowed ascent gradient moves nothing
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    if inf_in_pass == 2:
        _overflow(model)
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    assert opt.last_step_skipped
    _assert_unchanged(model, opt, before)  # weights bit-exact, momentum untouched
    assert scaler.get_scale() == 2.0**9  # backed off
    _scaled_sam_step(model, opt, x, y, scaler)  # the next step runs normally
    assert not opt.last_step_skipped
    assert not torch.equal(model[0].weight, before[0][0])


def test_caller_may_unscale_and_clip_the_descent_gradient():
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    o1, o2 = _make(m1), _make(m2)
    scaler = _scaler()
    _model_closure(m1, o1, x, y)()
    o1.first_step(zero_grad=True)
    _model_closure(m1, o1, x, y)()
    nn.utils.clip_grad_norm_(m1.parameters(), 0.1)
    o1.second_step(zero_grad=True)

    scaler.scale(nn.functional.cross_entropy(m2(x), y)).backward()
    o2.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(nn.functional.cross_entropy(m2(x), y)).backward()
    scaler.unscale_(o2.base_optimizer)  # second_step then must not unscale again
    nn.utils.clip_grad_norm_(m2.parameters(), 0.1)
    o2.second_step(zero_grad=True, grad_scaler=scaler)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p1, p2, rtol=0, atol=1e-7)


def test_disabled_scaler_is_the_default_path():
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    o1, o2 = _make(m1), _make(m2)
    _model_closure(m1, o1, x, y)()
    o1.first_step(zero_grad=True)
    _model_closure(m1, o1, x, y)()
    o1.second_step(zero_grad=True)
    _scaled_sam_step(m2, o2, x, y, torch.amp.GradScaler("cpu", enabled=False))
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_grad_scaler_in_one_step_only_raises():
    x, y = _data()
    model = _mlp()
    opt = _make(model)
    scaler = _scaler()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    with pytest.raises(LeantrainError, match="same grad_scaler"):
        opt.second_step(zero_grad=True)


def test_bf16_autocast_step_matches_hand_computed_sam():
    x, y = _data()
    model = _mlp()
    w0 = [p.detach().clone() for p in model.parameters()]
    lr, rho = 0.1, 0.05

    def bf16_loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.functional.cross_entropy(model(x), y)

    g1 = torch.autograd.grad(bf16_loss(), list(model.parameters()))
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in g1]))
    with torch.no_grad():
        for p, g in zip(model.parameters(), g1, strict=True):
            p.add_(g * (rho / (norm + 1e-12)))
    g2 = torch.autograd.grad(bf16_loss(), list(model.parameters()))
    expected = [w - lr * g for w, g in zip(w0, g2, strict=True)]
    with torch.no_grad():
        for p, w in zip(model.parameters(), w0, strict=True):
            p.copy_(w)

    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    bf16_loss().backward()
    opt.first_step(zero_grad=True)
    bf16_loss().backward()
    opt.second_step(zero_grad=True)
    assert g1[0].dtype == torch.float32  # bf16 compute, fp32 weights and gradients: no scaler needed
    for p, e in zip(model.parameters(), expected, strict=True):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-7)
    assert not torch.equal(model[0].weight, w0[0])


def test_fp16_autocast_overflow_backs_off_until_a_step_is_taken():
    x, y = _data()
    model = _mlp()
    opt = _make(model)
    scaler = _scaler(scale=2.0**40)  # fp16 activation gradients overflow at this scale
    before = [p.detach().clone() for p in model.parameters()]
    skipped = 0
    for _ in range(30):
        for _pass in range(2):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if _pass == 0:
                opt.first_step(zero_grad=True, grad_scaler=scaler)
        opt.second_step(zero_grad=True, grad_scaler=scaler)
        if not opt.last_step_skipped:
            break
        skipped += 1
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert skipped >= 1 and not opt.last_step_skipped
    assert scaler.get_scale() == 2.0 ** (40 - skipped)
    assert not torch.equal(model[0].weight, before[0])


def test_two_call_form_under_torch_compile_matches_eager_without_recompiling():
    """The compile-friendly path: a compiled model, first_step/second_step outside any compiled region."""
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(len(example_inputs))
        return gm.forward

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    eager, compiled = make(), make()
    torch._dynamo.reset()
    forward = torch.compile(compiled, backend=counting_backend)
    opts = [SAM(m.parameters(), rho=0.1, lr=0.1, momentum=0.9) for m in (eager, compiled)]
    for step in range(3):
        for f, opt in ((eager, opts[0]), (forward, opts[1])):
            nn.functional.cross_entropy(f(x), y).backward()
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(f(x), y).backward()
            opt.second_step(zero_grad=True)
        if step == 0:
            after_first = len(compiles)
    assert after_first >= 1 and len(compiles) == after_first  # the perturbation never forces a recompile
    assert all(torch.equal(p, q) for p, q in zip(eager.parameters(), compiled.parameters(), strict=True))
    torch._dynamo.reset()
