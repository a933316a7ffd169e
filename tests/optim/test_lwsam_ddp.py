"""LW-SAM under DistributedDataParallel with two gloo processes: no reducer error, and the single-process result."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from leantrain.optim import LayerwiseSAM

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from lwsam_ddp_worker import model_and_batches  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(tmp_path, second_pass, form):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    port, out = _free_port(), str(tmp_path / "rank0.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "lwsam_ddp_worker.py"), str(rank), "2", str(port), out, second_pass, form],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for rank in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=120)[0].decode())
    finally:
        for proc in procs:
            proc.kill()
    assert all(proc.returncode == 0 for proc in procs), "\n".join(logs)
    return torch.load(out, weights_only=True), torch.load(out + ".1", weights_only=True)


@pytest.mark.parametrize("form", ["two-call", "sam_training_step"])
@pytest.mark.parametrize("second_pass", ["truncated", "masked"])
def test_two_replicas_equal_one_process_on_the_whole_batch(tmp_path, second_pass, form):
    rank0, rank1 = _run_two_ranks(tmp_path, second_pass, form)
    for a, b in zip(rank0["params"], rank1["params"], strict=True):
        assert torch.equal(a, b)  # the replicas stay identical
    model, batches = model_and_batches()
    opt = LayerwiseSAM(model, lr=0.1, momentum=0.9, num_layers=1, second_pass="masked")
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    assert rank0["selection"] == list(opt.selection)
    # two shards of 8 with a mean loss, averaged by DDP, are the batch of 16 (up to float64 rounding)
    for a, b in zip(rank0["params"], model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)
