"""Which training rows each worker reads: capacity-proportional blocks, and loss-biased rows for the slow workers.

Biased local SGD (arXiv 2508.08540; official code jjihyunh/BiasedLocalSGD, ``train.py`` and
``feeders/feeder_cifar.py``):

- **Blocks.** Data is dealt in blocks of ``S = floor(N / (B * sum_j H_j))`` rounds. At a block's start the row indices
  are shuffled and worker j gets ``S * H_j * B`` of them, read in order, ``B`` per local step: one pass over the
  data is split in proportion to the steps each worker takes.
- **Biased sampling** (the code's ``biased = 1``). Every worker records each row's latest loss in a table
  (initialised to +inf: unseen rows first); at a block's start the tables are merged with MIN (the code
  all-reduces one table per MPI process; here one per worker, so the result does not depend on the placement); a
  random candidate pool ``pool_ratio`` (4) times the slow workers' need is drawn, and the slow workers get its
  highest-loss rows (shuffled); the fast workers get a fresh random shuffle of all rows (they may overlap with the
  slow workers' rows). The README says the *slower* workers get the high-loss data; that is what is done here.

The shuffles draw from a generator seeded by (seed, block), and the merged table is the same on every process, so
every process computes the same allocation without sending it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from leantrain.errors import ConfigError


class LossScores:
    """Per-row latest training loss (+inf until a row is trained on), one table per worker this process hosts,
    merged across all workers with MIN (the official code's all-reduce MIN). Keeping one table per worker, not
    per process, makes the merged table independent of how the workers are placed in processes."""

    def __init__(self, num_rows: int, workers: int = 1):
        self.tables = torch.full((workers, num_rows), math.inf, dtype=torch.float32)

    @property
    def values(self) -> torch.Tensor:
        """The merged table (right after :meth:`merge`; every worker's table is then the same)."""
        return self.tables[0]

    def record(self, rows: torch.Tensor, losses: torch.Tensor, slot: int = 0) -> None:
        """The latest losses of ``rows`` seen by the ``slot``-th worker of this process."""
        self.tables[slot, rows] = losses.detach().to(torch.float32).cpu()

    def merge(self, group=None) -> None:
        """MIN over this process's workers, then an all-reduce MIN over the processes of ``group`` (default: the
        default group; a CPU-capable group such as gloo)."""
        merged = self.tables.min(0).values
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(merged, op=dist.ReduceOp.MIN, group=group)
        self.tables[:] = merged

    def highest(self, candidates: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` candidates with the highest merged score (ties: in the candidates' order)."""
        scores = self.values.numpy()[candidates]
        order = np.argsort(-scores, kind="stable")
        return candidates[order[:k]]


def block_rounds(num_rows: int, batch_size: int, steps: Sequence[int]) -> int:
    """Rounds per block: ``floor(N / (B * sum_j H_j))`` (at least one round must fit)."""
    need = batch_size * sum(steps)
    if num_rows < need:
        raise ConfigError(f"one round needs {need} training rows (batch {batch_size} x {sum(steps)} local "
                          f"steps in all) but the data has {num_rows}; lower data.batch_size or "
                          "hetero.period_steps")  # fmt: skip
    return num_rows // need


def block_rows(num_rows: int, batch_size: int, steps: Sequence[int], rng: np.random.Generator,
               scores: LossScores | None = None, slow: Sequence[int] = (),
               pool_ratio: float = 4.0) -> tuple[list[np.ndarray], int]:  # fmt: skip
    """Rows of every worker for one block (worker j: ``S * H_j * B`` rows, read in order) and the block's rounds S.

    With ``scores`` and ``slow`` workers, those get the highest-loss rows of a random candidate pool of
    ``pool_ratio`` times their need; the other workers get consecutive slices of a fresh permutation of all rows.
    """
    rounds = block_rounds(num_rows, batch_size, steps)
    sizes = [rounds * h * batch_size for h in steps]
    perm = rng.permutation(num_rows)
    if scores is None or not slow:
        bounds = np.cumsum([0, *sizes])
        return [perm[bounds[j] : bounds[j + 1]] for j in range(len(steps))], rounds
    if pool_ratio < 1:
        raise ConfigError(f"pool_ratio={pool_ratio!r} is invalid; expected a number >= 1")
    need = sum(sizes[j] for j in slow)
    pool = rng.choice(num_rows, size=min(num_rows, math.ceil(pool_ratio * need)), replace=False)
    top = scores.highest(pool, need)
    rng.shuffle(top)
    out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(steps)
    at = 0
    for j in slow:
        out[j], at = top[at : at + sizes[j]], at + sizes[j]
    at = 0
    for j in range(len(steps)):
        if j not in slow:
            out[j], at = perm[at : at + sizes[j]], at + sizes[j]
    return out, rounds
