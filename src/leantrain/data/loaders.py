"""Deterministic mini-batches over in-memory arrays, without ``torch.utils.data`` worker processes.

The datasets here fit in memory, so a batch is just an index into tensors built once. Shuffling uses
a ``torch.Generator`` seeded from ``(seed, epoch)``: the order of epoch ``e`` is the same on every
run and every machine, and resuming at epoch ``e`` needs only ``set_epoch(e)``.

Padding-aware batching: for right-padded token ids, give ``trim_key`` and the real ``lengths``; each
batch is then cut to its longest member and gets an int64 attention mask (1 = real token).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from leantrain.errors import ConfigError


def epoch_seed(seed: int, epoch: int) -> int:
    """Mix ``(seed, epoch)`` into one 63-bit generator seed (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _as_tensor(name: str, array: np.ndarray) -> torch.Tensor:
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise ConfigError(f"ArrayBatches array {name!r} has dtype {array.dtype}; expected numbers (tokenise texts)")
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array).copy()
    return torch.from_numpy(array)  # zero-copy: shares memory with the numpy array


class ArrayBatches:
    """Deterministic mini-batches over in-memory arrays, yielding dicts of torch tensors."""

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        trim_key: str | None = None,
        lengths: np.ndarray | None = None,
        pad_mask_key: str | None = "attention_mask",
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} is out of range; expected an integer >= 1")
        if not arrays:
            raise ConfigError("ArrayBatches needs at least one array")
        sizes = {name: len(a) for name, a in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ConfigError(f"ArrayBatches arrays must share their first dimension; got {sizes}")
        self.tensors = {name: _as_tensor(name, a) for name, a in arrays.items()}
        self.num_samples = next(iter(sizes.values()))
        self.batch_size, self.shuffle, self.seed, self.drop_last = int(batch_size), shuffle, seed, drop_last
        self.epoch = 0
        self.trim_key, self.pad_mask_key = trim_key, pad_mask_key
        self.lengths = self._check_trim(trim_key, lengths, pad_mask_key)

    def _check_trim(self, trim_key: str | None, lengths, pad_mask_key: str | None) -> torch.Tensor | None:
        if trim_key is None and lengths is None:
            return None
        if trim_key is None or lengths is None:
            raise ConfigError("ArrayBatches: give both trim_key and lengths for padding-aware batching, or neither")
        if trim_key not in self.tensors or self.tensors[trim_key].ndim != 2:
            raise ConfigError(f"trim_key={trim_key!r} must name a 2-D array among {sorted(self.tensors)}")
        if pad_mask_key is not None and pad_mask_key in self.tensors:
            raise ConfigError(f"pad_mask_key={pad_mask_key!r} clashes with an input array of the same name")
        lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.int64)
        width = self.tensors[trim_key].shape[1]
        if lengths.shape != (self.num_samples,):
            raise ConfigError(f"lengths has shape {tuple(lengths.shape)}; expected ({self.num_samples},)")
        if bool((lengths < 1).any()) or bool((lengths > width).any()):
            raise ConfigError(
                f"lengths has values in [{int(lengths.min())}, {int(lengths.max())}]; expected values in [1, {width}]"
            )
        return lengths

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order: epoch ``e`` always gets the permutation seeded by ``(seed, e)``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def order(self) -> torch.Tensor | None:
        """The sample order of the current epoch (``None`` = natural order, no shuffle)."""
        if not self.shuffle:
            return None
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.order()
        for b in range(len(self)):
            start, stop = b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples)
            if order is None:  # contiguous slices are views, no copy
                batch = {name: t[start:stop] for name, t in self.tensors.items()}
                lengths = None if self.lengths is None else self.lengths[start:stop]
            else:
                idx = order[start:stop]
                batch = {name: t.index_select(0, idx) for name, t in self.tensors.items()}
                lengths = None if self.lengths is None else self.lengths.index_select(0, idx)
            if lengths is not None:
                batch.update(self._trim(batch[self.trim_key], lengths))
            yield batch

    def _trim(self, ids: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        width = int(lengths.max())
        out = {self.trim_key: ids[:, :width].contiguous()}  # (B, L)
        if self.pad_mask_key is not None:
            positions = torch.arange(width)
            out[self.pad_mask_key] = (positions[None, :] < lengths[:, None]).to(torch.int64)  # (B, L)
        return out
