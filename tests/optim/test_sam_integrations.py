"""SAM outside leantrain's loop: accelerate's GradScaler skipping a step, LR schedulers, BatchNorm in step(closure)."""

import copy
import warnings

import pytest
import torch
from torch import nn

from leantrain.optim import SAM, LayerwiseSAM

X = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))


def _mlp(bn=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), *([nn.BatchNorm1d(8)] if bn else []), nn.ReLU(), nn.Linear(8, 3))


def _sam(kind, model):
    if kind == "lwsam":
        return LayerwiseSAM(model, num_layers=1, rho=0.5, lr=0.1, momentum=0.9)
    return SAM(model.parameters(), rho=0.5, lr=0.1, momentum=0.9)


def _loss(model):
    return nn.functional.cross_entropy(model(X), Y)


# ---------------------------------------------------------------- accelerate's GradScaler skips optimizer.step()


@pytest.mark.parametrize("kind", ["sam", "lwsam"])
def test_a_step_skipped_by_accelerate_is_cancelled_bit_exactly_and_the_next_step_works(kind):
    """AcceleratedOptimizer.step calls scaler.step(sam), which skips sam.step() on inf; cancel_step undoes it."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer

    accelerate.Accelerator(cpu=True)  # AcceleratedOptimizer reads the shared AcceleratorState
    model = _mlp()
    sam = _sam(kind, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)  # backs off to 1.0: the retried step is then unscaled
    opt = AcceleratedOptimizer(sam, device_placement=False, scaler=scaler)
    w0 = [p.detach().clone() for p in model.parameters()]

    scaler.scale(_loss(model)).backward()
    sam.first_step(zero_grad=True)
    scaler.scale(_loss(model)).backward()
    next(p for p in model.parameters() if p.grad is not None).grad[0] = float("inf")  # overflow in the descent pass
    opt.step()
    assert opt.step_was_skipped and sam.perturbed  # the weights are still at w + ε: the bug
    assert sam.cancel_step() and not sam.perturbed and sam.last_step_skipped
    assert not sam.cancel_step()  # nothing pending any more
    for p, w in zip(model.parameters(), w0, strict=True):
        assert torch.equal(p, w) and p.requires_grad  # bit-exact; LayerwiseSAM's masked layers trainable again
    assert scaler.get_scale() == 1.0

    sam.zero_grad()
    scaler.scale(_loss(model)).backward()
    sam.first_step(zero_grad=True)  # no "first_step was called twice"
    scaler.scale(_loss(model)).backward()
    opt.step()
    assert not opt.step_was_skipped and not sam.perturbed

    reference = _mlp()
    ref_opt = _sam(kind, reference)

    def closure():
        ref_opt.zero_grad()
        loss = _loss(reference)
        loss.backward()
        return loss

    ref_opt.step(closure)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- LR schedulers


@pytest.mark.parametrize("kind", ["sam", "lwsam"])
def test_the_two_call_form_counts_as_optimizer_step_for_lr_schedulers(kind):
    """No "lr_scheduler.step() before optimizer.step()" warning: second_step is the optimizer's step."""
    model = _mlp()
    sam = _sam(kind, model)
    schedule = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            _loss(model).backward()
            sam.first_step(zero_grad=True)
            _loss(model).backward()
            sam.second_step(zero_grad=True)
            schedule.step()
    assert sam.param_groups[0]["lr"] == pytest.approx(0.025)
    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


# ---------------------------------------------------------------- BatchNorm in step(closure)


def _closure(model, opt):
    def closure():
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        return loss

    return closure


def test_step_closure_with_model_keeps_the_first_pass_batchnorm_statistics():
    model = _mlp(bn=True)
    first_pass_only = copy.deepcopy(model)
    first_pass_only(X)  # train mode: the unperturbed forward alone updates the running statistics
    sam = SAM(model.parameters(), model=model, rho=0.5, lr=0.1)
    sam.step(_closure(model, sam))
    bn, ref = model[1], first_pass_only[1]
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)


def test_step_closure_without_model_updates_batchnorm_statistics_in_both_passes():
    """Documented behaviour without model=: the perturbed pass moves the statistics too (pass model= to avoid it)."""
    model = _mlp(bn=True)
    sam = SAM(model.parameters(), rho=0.5, lr=0.1)
    sam.step(_closure(model, sam))
    assert int(model[1].num_batches_tracked) == 2
