"""One rank of the two-process LW-SAM DDP test (run by test_lwsam_ddp.py, not collected by pytest)."""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from leantrain.optim import LayerwiseSAM, sam_training_step


def model_and_batches(seed=0, steps=3, n=16):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
               for _ in range(steps)]  # fmt: skip
    return model, batches


def main(rank: int, world: int, port: int, path: str, second_pass: str, form: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, batches = model_and_batches()
    ddp = DistributedDataParallel(model)
    if form == "two-call":  # the user's own loop, optimizer built from the DDP model, forwards through DDP
        opt = LayerwiseSAM(ddp, lr=0.1, momentum=0.9, num_layers=1, second_pass=second_pass)
    else:  # built from the plain model; sam_training_step tells it about DDP
        opt = LayerwiseSAM(model, lr=0.1, momentum=0.9, num_layers=1, second_pass=second_pass)
    for x, y in batches:
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        xs, ys = x[shard], y[shard]
        if form == "two-call":
            opt.zero_grad()
            F.cross_entropy(ddp(xs), ys).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(ddp(xs), ys).backward()
            opt.second_step(zero_grad=True)
        else:
            sam_training_step(ddp, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (xs, ys), opt, ddp_no_sync=False)
    if rank == 0:
        torch.save({"params": [p.detach() for p in model.parameters()], "selection": list(opt.selection)}, path)
    else:
        torch.save({"params": [p.detach() for p in model.parameters()], "selection": list(opt.selection)}, path + ".1")
    # both ranks done before either tears gloo down: a rank destroying its group while the other still talks to it
    # aborted with "terminate called without an active exception" (seen once in CI)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
