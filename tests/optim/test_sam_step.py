import contextlib
import copy
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from leantrain.errors import ConfigError
from leantrain.optim import SAM, LayerwiseSAM, maybe_no_sync, sam_training_step


def _mlp(seed=0, bn=False, dtype=torch.float64):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).to(dtype)


def _data(n=8, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return x, y


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _sam(model):
    return SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)


def _same(m1, m2):
    return all(torch.equal(p1, p2) for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True))


# ------------------------------------------------------------ one batch, accumulation


def test_one_batch_equals_sam_step_closure():
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    o1, o2 = _sam(m1), _sam(m2)
    for _ in range(3):
        l1 = o1.step(_closure(m1, o1, x, y))
        l2 = sam_training_step(m2, _loss, (x, y), o2)  # a tuple is one batch, not two micro-batches
        assert torch.equal(l1.detach(), l2)
    assert _same(m1, m2)
    assert all(p.grad is None for p in m2.parameters())


def test_one_batch_equals_layerwise_sam_step_closure():
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    o1 = LayerwiseSAM(m1, lr=0.1, num_layers=1, alpha=0.5)
    o2 = LayerwiseSAM(m2, lr=0.1, num_layers=1, alpha=0.5)
    for _ in range(3):
        o1.step(_closure(m1, o1, x, y))
        sam_training_step(m2, _loss, (x, y), o2)
    assert _same(m1, m2)
    assert all(p.requires_grad for p in m2.parameters())


def test_two_micro_batches_of_4_equal_one_batch_of_8():
    x, y = _data(n=8)
    m1, m2 = _mlp(), _mlp()
    o1, o2 = _sam(m1), _sam(m2)
    for _ in range(3):
        full = sam_training_step(m1, _loss, (x, y), o1)
        micro = sam_training_step(m2, _loss, [(x[:4], y[:4]), (x[4:], y[4:])], o2)
        torch.testing.assert_close(micro, full, rtol=1e-12, atol=1e-12)  # the mean first-pass loss
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-12)
    assert not _same(m1, _mlp())  # it did train


def test_accumulation_perturbs_once_with_the_whole_window_gradient():
    x, y = _data(n=8)
    model = _mlp()
    opt = _sam(model)
    full_grad = torch.autograd.grad(_loss(model, (x, y)), list(model.parameters()))
    sam_training_step(model, _loss, [(x[:4], y[:4]), (x[4:], y[4:])], opt)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in full_grad]))
    for p, g in zip(model.parameters(), full_grad, strict=True):
        torch.testing.assert_close(opt.state[p]["e_w"], 0.1 * g / norm, rtol=1e-10, atol=1e-12)


def test_batchnorm_keeps_the_first_pass_statistics():
    x, y = _data(n=8)
    model = _mlp(bn=True)
    reference = copy.deepcopy(model)
    for half in (slice(0, 4), slice(4, 8)):
        reference(x[half])  # what the first pass alone does to the running statistics
    sam_training_step(model, _loss, [(x[:4], y[:4]), (x[4:], y[4:])], _sam(model))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(reference[1], name)), name


def test_empty_batch_list_raises():
    model = _mlp()
    with pytest.raises(ConfigError, match=r"batches=\[\]"):
        sam_training_step(model, _loss, [], _sam(model))


# ------------------------------------------------------------ mixed precision


def test_bf16_autocast_equals_the_two_call_form_under_autocast():
    x, y = _data(dtype=torch.float32)
    m1, m2 = _mlp(dtype=torch.float32), _mlp(dtype=torch.float32)
    o1, o2 = _sam(m1), _sam(m2)
    for pass_ in (1, 2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(m1, (x, y))
        loss.backward()
        if pass_ == 1:
            o1.first_step(zero_grad=True)
    o1.second_step(zero_grad=True)
    sam_training_step(m2, _loss, (x, y), o2, autocast_dtype=torch.bfloat16)
    assert _same(m1, m2)
    assert all(p.dtype == torch.float32 for p in m2.parameters())


def test_grad_scaler_equals_unscaled_and_skips_on_overflow():
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    o1, o2 = _sam(m1), _sam(m2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    sam_training_step(m1, _loss, (x, y), o1)
    sam_training_step(m2, _loss, (x, y), o2, grad_scaler=scaler)
    assert _same(m1, m2) and not o2.last_step_skipped
    before = [p.detach().clone() for p in m2.parameters()]
    momentum = [o2.base_optimizer.state[p]["momentum_buffer"].clone() for p in m2.parameters()]
    calls = []

    def overflowing_loss(model, batch):
        calls.append(1)
        return _loss(model, batch) * (float("inf") if len(calls) == 1 else 1.0)

    sam_training_step(m2, overflowing_loss, (x, y), o2, grad_scaler=scaler)
    assert o2.last_step_skipped and scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, b) for p, b in zip(m2.parameters(), before, strict=True))
    buffers = [o2.base_optimizer.state[p]["momentum_buffer"] for p in m2.parameters()]
    assert all(torch.equal(b, m) for b, m in zip(buffers, momentum, strict=True))


def test_any_object_with_first_and_second_step_works():
    x, y = _data()
    model = _mlp()
    sam = _sam(model)
    log = []

    class Recorder:  # davda54-style optimizer: no grad_scaler argument, no zero_grad
        def first_step(self, zero_grad=False):
            log.append(("first", zero_grad))
            sam.first_step(zero_grad)

        def second_step(self, zero_grad=False):
            log.append(("second", zero_grad))
            sam.second_step(zero_grad)

    sam_training_step(model, _loss, (x, y), Recorder())
    assert log == [("first", True), ("second", True)]


# ------------------------------------------------------------ DDP


def test_maybe_no_sync_is_a_null_context_without_ddp():
    assert isinstance(maybe_no_sync(_mlp()), contextlib.nullcontext)


@pytest.fixture(scope="module")
def gloo_group():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _syncing_loss(model, log):
    def loss_fn(m, batch):
        log.append(m.require_backward_grad_sync)  # read by DDP's forward: what the coming backward will do
        return _loss(m, batch)

    return loss_fn


def test_ddp_first_pass_forward_and_backward_run_under_no_sync(gloo_group):
    x, y = _data(n=8)
    plain, wrapped = _mlp(), _mlp()
    ddp = DistributedDataParallel(wrapped)
    o1, o2 = _sam(plain), _sam(wrapped)
    micro = [(x[:4], y[:4]), (x[4:], y[4:])]
    log = []
    for _ in range(2):
        l1 = sam_training_step(plain, _loss, micro, o1)
        l2 = sam_training_step(ddp, _syncing_loss(ddp, log), micro, o2)
        torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    for p1, p2 in zip(plain.parameters(), wrapped.parameters(), strict=True):
        torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-12)
    # pass 1: no all-reduce on either micro-batch; pass 2: one all-reduce, on the last micro-batch
    assert log == [False, False, False, True] * 2
    assert ddp.require_backward_grad_sync


def test_ddp_with_synced_first_pass_and_layerwise_sam(gloo_group):
    x, y = _data()
    model = _mlp()
    ddp = DistributedDataParallel(model)
    opt = LayerwiseSAM(model, lr=0.1, num_layers=2)
    with pytest.raises(ConfigError, match="ddp_no_sync=False"):
        sam_training_step(ddp, _loss, (x, y), opt)
    log = []
    sam_training_step(ddp, _syncing_loss(ddp, log), (x, y), opt, ddp_no_sync=False)
    # the first pass is all-reduced by DDP; the second bypasses DDP's reducer (LayerwiseSAM all-reduces w' itself)
    assert log == [True, False]
    assert ddp.require_backward_grad_sync


def test_ddp_grad_scaler_overflow_is_shared_and_skips(gloo_group):
    x, y = _data()
    model = _mlp()
    ddp = DistributedDataParallel(model)
    opt = _sam(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def overflowing_loss(m, batch):
        calls.append(1)
        return _loss(m, batch) * (float("inf") if len(calls) == 1 else 1.0)

    sam_training_step(ddp, overflowing_loss, (x, y), opt, grad_scaler=scaler)
    assert opt.last_step_skipped and scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    sam_training_step(ddp, _loss, (x, y), opt, grad_scaler=scaler)
    assert not opt.last_step_skipped


def test_ddp_overflow_on_another_replica_skips_here_too(gloo_group, monkeypatch):
    x, y = _data()
    model = _mlp()
    ddp = DistributedDataParallel(model)
    opt = _sam(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    all_reduce = dist.all_reduce

    def other_replica_overflowed(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if op == dist.ReduceOp.MAX:  # the overflow flag, not DDP's gradient buckets
            tensor.fill_(1.0)
            return None
        return all_reduce(tensor, op=op, group=group, async_op=async_op)

    monkeypatch.setattr(dist, "all_reduce", other_replica_overflowed)
    sam_training_step(ddp, _loss, (x, y), opt, grad_scaler=scaler)  # this replica's gradients are finite
    assert opt.last_step_skipped and scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_ddp_layerwise_sam_leaves_a_chosen_parameter_without_gradient_untouched(gloo_group):
    """A chosen layer's parameter unused in the forward keeps grad None (no weight decay/momentum), as without DDP."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = nn.Linear(4, 4), nn.Linear(4, 3)
            self.gate = nn.Parameter(torch.ones(3))  # the root's own layer: never used

        def forward(self, x):
            return self.out(torch.tanh(self.a(x)))

    finals = []
    for ddp in (False, True):
        torch.manual_seed(0)
        model = Net().double()
        wrapped = DistributedDataParallel(model, find_unused_parameters=True) if ddp else model
        opt = LayerwiseSAM(wrapped, lr=0.1, momentum=0.9, weight_decay=0.1, num_layers=3)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)

            def closure(opt=opt, wrapped=wrapped, x=x, y=y):
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(wrapped(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        finals.append([p.detach().clone() for p in model.parameters()])
        assert torch.equal(model.gate, torch.ones(3, dtype=torch.float64))
    for a, b in zip(*finals, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
