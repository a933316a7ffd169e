"""AsyncSAM's two-process mode set up for a GPU: host shared-memory buffers, the spawn start method, a CPU replica.

There is no GPU here. The spawn path runs for real on the CPU (forced with ``worker_start="spawn"``) and must give the
sequential mode's trajectory; the device side is checked with tensors on the "meta" device (a non-CPU device without
data) and a stand-in for the device synchronization.
"""

import pytest
import torch
from async_sam_steps import rows, train_steps
from torch import nn

from leantrain.errors import ConfigError
from leantrain.optim import Ascent, AsyncSAM
from leantrain.optim import ascent_worker as aw
from leantrain.train import ClassificationTask


def _rows(n=96):
    return rows(n)


def _dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.2), nn.LayerNorm(16), nn.Linear(16, 3))


def _train(model, opt, rows, steps=5, batch=16):
    return train_steps(model, opt, rows, steps, batch)


@pytest.mark.parametrize("adaptive", [False, True])
def test_spawned_worker_matches_the_sequential_mode_exactly(adaptive):
    """The GPU path's start method on the CPU: everything the worker gets is pickled to a fresh interpreter."""
    rows = _rows()
    kw = {"rho": 0.1, "lr": 0.1, "momentum": 0.9, "adaptive": adaptive}
    a, b = _dropout_model(), _dropout_model()
    la = _train(a, AsyncSAM(a.parameters(), model=a, ascent=Ascent(ClassificationTask().loss, rows, 12, seed=7), **kw),
                rows)  # fmt: skip
    ascent = Ascent(ClassificationTask().loss, rows, batch_size=12, seed=7)
    with AsyncSAM(b.parameters(), model=b, ascent=ascent, mode="two_process", on_miss="wait", worker_start="spawn",
                  **kw) as opt:  # fmt: skip
        lb = _train(b, opt, rows)
        stats = opt.async_stats
        assert opt._worker.start_method == "spawn"
        assert all(w.device.type == "cpu" and w.is_shared() for w in opt._worker.shared.weights)
    assert la == lb
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert stats["misses"] == 0 and stats["staleness"] == {1: 4}


def test_spawned_worker_failure_is_reported():
    def not_picklable(model, batch):  # a local function cannot be pickled to a spawned process
        return model(batch["x"]).sum()

    model = _dropout_model()
    opt = AsyncSAM(model.parameters(), lr=0.1, model=model, ascent=Ascent(not_picklable, _rows(), batch_size=8),
                   mode="two_process", worker_start="spawn")  # fmt: skip
    with pytest.raises(ConfigError, match="starts with .spawn., which pickles .* Can.t pickle local object"):
        _train(model, opt, _rows(), steps=2)
    opt.close()


def test_exchange_buffers_are_host_shared_memory_for_device_parameters():
    params = [torch.empty(3, 4, device="meta"), torch.empty(2, dtype=torch.float16, device="meta")]
    buffers = aw.host_buffers(params)
    assert [(b.device.type, b.shape, b.dtype) for b in buffers] == [
        ("cpu", torch.Size([3, 4]), torch.float32), ("cpu", torch.Size([2]), torch.float16),
    ]  # fmt: skip
    assert all(b.is_shared() for b in buffers)
    shared = aw._Shared(torch.multiprocessing.get_context("spawn"), params)
    assert all(t.device.type == "cpu" and t.is_shared() for t in [*shared.weights, *shared.vectors, shared.norm])


def test_start_method():
    cpu = [torch.zeros(2)]
    on_device = [torch.zeros(2), torch.empty(2, device="meta")]  # any non-CPU device, as a CUDA parameter
    assert aw.worker_start_method(None, cpu) == "fork"  # Linux, CPU only: fork, as DataLoader workers
    assert aw.worker_start_method(None, on_device) == "spawn"
    assert aw.worker_start_method("spawn", cpu) == "spawn"
    assert aw.worker_start_method("forkserver", on_device) == "forkserver"
    with pytest.raises(ConfigError, match="worker_start='fork' cannot be used while meta is in use"):
        aw.worker_start_method("fork", on_device)
    with pytest.raises(ConfigError, match="worker_start='thread' is invalid"):
        aw.worker_start_method("thread", cpu)


def test_start_method_when_cuda_is_initialized_for_another_model(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert aw.device_in_use([torch.zeros(2)]) == "cuda"
    assert aw.worker_start_method(None, [torch.zeros(2)]) == "spawn"
    with pytest.raises(ConfigError, match="while cuda is in use"):
        aw.worker_start_method("fork", [torch.zeros(2)])


def test_unsafe_start_method_fails_at_construction():
    model = nn.Linear(3, 2, device="meta")
    with pytest.raises(ConfigError, match="worker_start='fork'"):
        AsyncSAM(model.parameters(), lr=0.1, model=model, ascent=Ascent(lambda m, b: 0, _rows(), batch_size=8),
                 mode="two_process", worker_start="fork")  # fmt: skip


def test_take_copies_host_buffers_to_the_parameters_device():
    """Host → device in the training process: the published vectors arrive on the parameters' device."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1)).to("meta")
    params = list(model.parameters())
    worker = aw.AscentWorker(model, params, [None] * 4, Ascent(lambda m, b: 0, _rows(), batch_size=8))
    worker.shared = aw._Shared(torch.multiprocessing.get_context("spawn"), params)
    assert worker.take(0, wait=False) is None  # nothing published yet
    worker.shared.has_grad[:] = torch.tensor([True, True, False, True])
    worker.shared.ascent_version.value, worker.shared.ascent_batch.value = 0, 8
    result = worker.take(0, wait=True)
    assert [None if v is None else (v.device.type, v.shape) for v in result.vectors] == [
        ("meta", torch.Size([2, 3])), ("meta", torch.Size([2])), None, ("meta", torch.Size([1])),
    ]  # fmt: skip
    assert result.norm.device.type == "meta" and (result.version, result.batch_size) == (0, 8)


def test_publish_copies_the_weights_into_the_host_buffers():
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    worker = aw.AscentWorker(model, params, [None, None], Ascent(lambda m, b: 0, _rows(), batch_size=8))
    worker.shared = aw._Shared(torch.multiprocessing.get_context("fork"), params)
    worker.publish(5)
    assert worker.shared.weights_version.value == 5
    for w, p in zip(worker.shared.weights, params, strict=True):
        assert torch.equal(w, p) and w.data_ptr() != p.data_ptr()


def test_host_replica_is_a_cpu_copy_with_the_same_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    model(torch.randn(8, 3)).sum().backward()
    replica = aw.host_replica(model)
    for (n, p), (m, q) in zip(model.state_dict().items(), replica.state_dict().items(), strict=True):
        assert n == m and torch.equal(p, q) and p.data_ptr() != q.data_ptr() and q.device.type == "cpu"
    assert [p.requires_grad for p in replica.parameters()] == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in replica.parameters())
    assert all(isinstance(p, nn.Parameter) for p in replica.parameters())


def test_synchronize_waits_only_for_a_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: calls.append(device))
    aw.synchronize(torch.device("cpu"))
    aw.synchronize(torch.device("meta"))
    assert calls == []
    aw.synchronize(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]


def test_descent_time_is_measured_after_the_device_finished(monkeypatch):
    seen = []
    monkeypatch.setattr("leantrain.optim.async_sam.synchronize", lambda device: seen.append(device))
    rows = _rows()
    model = _dropout_model()
    with AsyncSAM(model.parameters(), lr=0.1, model=model, ascent=Ascent(ClassificationTask().loss, rows, 8),
                  mode="two_process") as opt:  # fmt: skip
        _train(model, opt, rows, steps=2)
    assert seen == [torch.device("cpu")] * 2  # once per step, before the descent time is read


def test_data_loader_with_loader_processes_is_refused_in_two_process_mode():
    from torch.utils.data import DataLoader

    rows = _rows()
    loader = DataLoader([{k: v[i] for k, v in rows.items()} for i in range(32)], batch_size=8, num_workers=2)
    model = _dropout_model()
    with pytest.raises(ConfigError, match="num_workers=2"):
        AsyncSAM(model.parameters(), lr=0.1, model=model, ascent=Ascent(ClassificationTask().loss, loader, 8),
                 mode="two_process")  # fmt: skip
