"""Federated data partitioners: split sample indices among clients, IID or with label skew.

- ``iid``: a random permutation cut into near-equal parts.
- ``dirichlet``: for every class, the class's samples are divided among clients in proportions drawn
  from Dirichlet(alpha); small alpha gives each client few dominant labels, large alpha approaches
  IID. From Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
  Visual Classification" (arXiv 1909.06335). As in common implementations (e.g. NIID-Bench), the draw
  is repeated until every client holds at least ``min_size`` samples (bounded by ``MAX_DIRICHLET_DRAWS``).
- ``shards``: the pathological non-IID split of McMahan et al., "Communication-Efficient Learning of
  Deep Networks from Decentralized Data" (arXiv 1602.05629): sort by label, cut into
  ``num_clients * shards_per_client`` equal shards, deal each client ``shards_per_client`` at random.

Every function returns one sorted int64 index array per client; together they cover every sample
index exactly once, and the same seed gives the same partition.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from leantrain.errors import ConfigError, LeantrainError

MAX_DIRICHLET_DRAWS = 1000


def _check_int(field: str, value: Any, low: int, high: int | None = None) -> int:
    ok = not isinstance(value, bool) and isinstance(value, int | np.integer)
    if not ok or value < low or (high is not None and value > high):
        accepted = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ConfigError(f"{field}={value!r} is out of range; expected {accepted}")
    return int(value)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (len(labels) and labels.min() < 0):
        raise ConfigError(f"labels must be a 1-D array of non-negative integers; got {labels.dtype} {labels.shape}")
    if len(labels) == 0:
        raise ConfigError("labels is empty; expected at least one sample to partition")
    return labels.astype(np.int64, copy=False)


def iid(num_samples: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle ``range(num_samples)`` and cut it into ``num_clients`` parts whose sizes differ by at most one."""
    num_samples = _check_int("num_samples", num_samples, 1)
    num_clients = _check_int("num_clients", num_clients, 1, num_samples)
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def _dirichlet_draw(by_class: list[np.ndarray], num_clients: int, alpha: float, rng) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for idx in by_class:
        idx = rng.permutation(idx)
        shares = rng.dirichlet(np.full(num_clients, alpha))  # (K,)
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for client, piece in enumerate(np.split(idx, cuts)):
            parts[client].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed split: each class is shared among clients in Dirichlet(``alpha``) proportions.

    Redraws (at most ``MAX_DIRICHLET_DRAWS`` times) until every client has ``min_size`` samples;
    raises ``LeantrainError`` if that never happens.
    """
    labels = _check_labels(labels)
    num_clients = _check_int("num_clients", num_clients, 1, len(labels))
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.number) or not 0 < alpha < math.inf:
        raise ConfigError(f"alpha={alpha!r} is out of range; expected a finite number > 0")
    min_size = _check_int("min_size", min_size, 0, len(labels) // num_clients)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts = _dirichlet_draw(by_class, num_clients, float(alpha), rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise LeantrainError(
        f"dirichlet partition: no draw in {MAX_DIRICHLET_DRAWS} gave all {num_clients} clients >= {min_size} "
        f"samples (alpha={alpha}, {len(labels)} samples); raise alpha or lower num_clients or min_size"
    )


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int = 2, seed: int = 0) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: label-sorted shards, ``shards_per_client`` dealt to each client."""
    labels = _check_labels(labels)
    num_clients = _check_int("num_clients", num_clients, 1, len(labels))
    limit = max(len(labels) // num_clients, 1)
    shards_per_client = _check_int("shards_per_client", shards_per_client, 1, limit)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))  # random order within each label before the stable sort
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, num_clients * shards_per_client)
    dealt = rng.permutation(len(pieces)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])).astype(np.int64) for row in dealt]


SCHEMES = {"iid": iid, "dirichlet": dirichlet, "shards": shards}
SCHEME_OPTIONS = {"iid": (), "dirichlet": ("alpha", "min_size"), "shards": ("shards_per_client",)}


def partition(scheme: str, labels: np.ndarray, num_clients: int, seed: int = 0, **kwargs: Any) -> list[np.ndarray]:
    """Dispatch to ``iid`` (uses only ``len(labels)``), ``dirichlet`` (needs ``alpha``) or ``shards``."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition scheme {scheme!r}; choices: {', '.join(SCHEMES)}")
    unknown = sorted(set(kwargs) - set(SCHEME_OPTIONS[scheme]))
    if unknown:
        valid = ", ".join(SCHEME_OPTIONS[scheme]) or "none"
        raise ConfigError(f"partition scheme {scheme!r} has no option {', '.join(unknown)}; valid options: {valid}")
    if scheme == "iid":
        return iid(len(labels), num_clients, seed)
    if scheme == "dirichlet" and "alpha" not in kwargs:
        raise ConfigError("partition scheme 'dirichlet' needs alpha (a finite number > 0, e.g. alpha=0.5)")
    return SCHEMES[scheme](labels, num_clients, seed=seed, **kwargs)
