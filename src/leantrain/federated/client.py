"""Client-side pieces shared by every algorithm: a client's data shard and local SGD on the working model.

Clients do not own copies of the data: :class:`ClientData` keeps one set of training tensors and, per client, an
index array, so 1,000 clients cost 1,000 index arrays. Each client's batch order is a seeded function of
(seed, round, client), so a run, and a resumed run, sees the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from leantrain.errors import ConfigError


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains each round: ``steps`` local SGD iterations (the papers' τ) on batches of ``batch_size``."""

    steps: int = 10
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"LocalTraining {name}={v!r} is invalid; expected an integer >= 1")
        if not self.lr > 0:
            raise ConfigError(f"LocalTraining lr={self.lr!r} is invalid; expected > 0")
        if not 0 <= self.momentum < 1 or not self.weight_decay >= 0:
            raise ConfigError("LocalTraining momentum must be in [0, 1) and weight_decay >= 0")


class ClientData:
    """The training rows (a dict of tensors) and each client's indices into them."""

    def __init__(self, arrays: dict[str, torch.Tensor], parts: list[np.ndarray],
                 unlabeled_parts: list[np.ndarray] | None = None):  # fmt: skip
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ConfigError(f"client data arrays must share their first dimension; got {sizes}")
        n = next(iter(sizes.values()))
        for cid, part in enumerate(parts):
            if len(part) == 0:
                raise ConfigError(f"client {cid} has no training samples; use a partition with min_size >= 1")
            if part.min() < 0 or part.max() >= n:
                raise ConfigError(f"client {cid}'s indices fall outside the {n} training rows")
        self.arrays = arrays
        self.parts = [torch.as_tensor(p, dtype=torch.int64) for p in parts]
        self.unlabeled_parts: list[torch.Tensor] | None = None
        if unlabeled_parts is not None:
            if len(unlabeled_parts) != len(parts):
                raise ConfigError(f"{len(unlabeled_parts)} unlabeled parts for {len(parts)} clients")
            for cid, part in enumerate(unlabeled_parts):
                if len(part) and (part.min() < 0 or part.max() >= n):
                    raise ConfigError(f"client {cid}'s unlabeled indices fall outside the {n} training rows")
            self.unlabeled_parts = [torch.as_tensor(p, dtype=torch.int64) for p in unlabeled_parts]

    @property
    def num_clients(self) -> int:
        return len(self.parts)

    def num_samples(self, cid: int) -> int:
        return len(self.parts[cid])

    def batches(self, cid: int, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches of client ``cid``: reshuffled every pass by a generator seeded with ``seed``."""
        return self._endless(self.parts[cid], batch_size, seed, tuple(self.arrays))

    def has_unlabeled(self, cid: int) -> bool:
        return self.unlabeled_parts is not None and len(self.unlabeled_parts[cid]) > 0

    def unlabeled_batches(self, cid: int, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]] | None:
        """Endless batches of client ``cid``'s unlabeled rows (no ``labels`` key), or None if it holds none."""
        if not self.has_unlabeled(cid):
            return None
        keys = tuple(k for k in self.arrays if k != "labels")
        return self._endless(self.unlabeled_parts[cid], batch_size, seed, keys)

    def _endless(self, idx: torch.Tensor, batch_size: int, seed: int, keys: tuple[str, ...]):
        gen = torch.Generator().manual_seed(seed)
        while True:
            order = idx[torch.randperm(len(idx), generator=gen)]
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                yield {k: self.arrays[k][rows] for k in keys}


@contextmanager
def trainable_only(model: nn.Module, names: set[str] | None):
    """Within the block only parameters named in ``names`` (None: all) get gradients; restored afterwards."""
    if names is None:
        yield
        return
    frozen = [p for n, p in model.named_parameters() if n not in names and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def local_sgd(model: nn.Module, loss_fn, batches: Iterator[dict[str, torch.Tensor]], steps: int, lr: float,
              momentum: float = 0.0, weight_decay: float = 0.0,
              momentum_buffers: dict[str, torch.Tensor] | None = None) -> dict[str, float]:  # fmt: skip
    """``steps`` SGD steps on the parameters that require grad; returns the mean loss and the samples processed.

    A fresh optimizer each call (no state leaks between clients), unless ``momentum_buffers`` (parameter name ->
    buffer) is given: its buffers are resumed and the dict is replaced in place by the new ones (stateful
    algorithms keep momentum across rounds with it). ``loss_fn(model, batch)`` returns the loss (or a tuple whose
    first item is the loss).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("local_sgd: the model has no trainable parameters")
    opt = torch.optim.SGD([p for _, p in named], lr=lr, momentum=momentum, weight_decay=weight_decay)
    for n, p in named:
        if momentum_buffers and n in momentum_buffers:
            opt.state[p]["momentum_buffer"] = momentum_buffers[n].detach().clone()
    model.train()
    total, samples = 0.0, 0
    for _ in range(steps):
        batch = next(batches)
        opt.zero_grad(set_to_none=True)
        out = loss_fn(model, batch)
        loss = out[0] if isinstance(out, tuple | list) else out
        value = loss.item()  # one read of the loss per step (a cross-device client's steps are tiny)
        if not math.isfinite(value):
            raise FloatingPointError(f"local loss is {value}")
        loss.backward()
        opt.step()
        n = len(next(iter(batch.values())))
        total += value * n
        samples += n
    if momentum_buffers is not None:
        kept = {n: opt.state[p].get("momentum_buffer") for n, p in named}
        momentum_buffers.clear()
        momentum_buffers.update({n: b.detach().clone() for n, b in kept.items() if b is not None})
    return {"loss": total / max(samples, 1), "samples": samples}
