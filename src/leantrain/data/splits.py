"""Deterministic train/val/test splitting rules shared by every dataset.

Classification sets without an official test split are cut with sklearn's ``train_test_split``,
stratified by label: first ``test_fraction`` of all samples, then ``val_fraction`` of all samples
from the rest. Sets with an official test split keep it and carve ``val_fraction`` of the official
train part (stratified); ``test_fraction`` is then only validated. ``train_subset=n`` keeps a
stratified n-sample subset of train. All draws come from one ``numpy.random.RandomState(seed)``, so
the same seed gives identical splits. A cut too small to hold every class once falls back to a plain
(unstratified) random cut. Language-model corpora are cut contiguously and ignore the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leantrain.errors import ConfigError


@dataclass(frozen=True)
class SplitConfig:
    """How to split a dataset; validated at construction."""

    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    train_subset: int | None = None

    def __post_init__(self) -> None:
        for field in ("val_fraction", "test_fraction"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not 0 <= value < 1:
                raise ConfigError(f"{field}={value!r} is out of range; expected a number in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            total = self.val_fraction + self.test_fraction
            raise ConfigError(
                f"val_fraction + test_fraction = {total:g} leaves no training data; expected a sum in [0, 1)"
            )
        subset = self.train_subset
        if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int | np.integer) or subset < 1):
            raise ConfigError(f"train_subset={subset!r} is out of range; expected None or an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} is out of range; expected an integer >= 0")


def _cut(idx: np.ndarray, y: np.ndarray, n_out: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (kept, cut) with ``n_out`` samples cut, stratified by ``y[idx]`` when possible."""
    if n_out == 0:
        return idx, idx[:0]
    from sklearn.model_selection import train_test_split  # imported lazily: ~1 s

    try:
        kept, cut = train_test_split(idx, test_size=n_out, stratify=y[idx], random_state=rng)
    except ValueError:  # a part too small to hold every class once
        kept, cut = train_test_split(idx, test_size=n_out, random_state=rng)
    return np.asarray(kept, dtype=np.int64), np.asarray(cut, dtype=np.int64)


def classification_indices(
    y: np.ndarray, config: SplitConfig, test_start: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays (train, val, test) into ``y``; ``test_start`` marks an official test part ``y[test_start:]``."""
    rng = np.random.RandomState(config.seed)
    everything = np.arange(len(y), dtype=np.int64)
    if test_start is None:
        rest, test = _cut(everything, y, round(config.test_fraction * len(y)), rng)
        n_val = round(config.val_fraction * len(y))
    else:
        rest, test = everything[:test_start], everything[test_start:]
        n_val = round(config.val_fraction * len(rest))
    if n_val >= len(rest):
        raise ConfigError(
            f"val_fraction={config.val_fraction} with test_fraction={config.test_fraction} leaves no training "
            f"samples out of {len(y)}; lower them"
        )
    train, val = _cut(rest, y, n_val, rng)
    if config.train_subset is not None:
        train = subset_indices(train, y, config.train_subset, rng)
    return train, val, test


def subset_indices(train: np.ndarray, y: np.ndarray, n: int, rng: np.random.RandomState) -> np.ndarray:
    """A stratified ``n``-sample subset of the index array ``train``."""
    if n > len(train):
        raise ConfigError(f"train_subset={n} is out of range; this split has {len(train)} training samples")
    if n == len(train):
        return train
    kept, _ = _cut(train, y, len(train) - n, rng)
    return kept


def contiguous_bounds(n: int, config: SplitConfig) -> tuple[slice, slice, slice]:
    """Train, val and test slices of a length-``n`` sequence, in that order (the seed is not used)."""
    n_test = round(config.test_fraction * n)
    n_val = round(config.val_fraction * n)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ConfigError(f"val_fraction and test_fraction leave no training tokens out of {n}; lower them")
    if config.train_subset is not None and config.train_subset > n_train:
        raise ConfigError(f"train_subset={config.train_subset} is out of range; train holds {n_train} tokens")
    train_end = n_train if config.train_subset is None else config.train_subset
    return slice(0, train_end), slice(n_train, n_train + n_val), slice(n_train + n_val, n)
