"""Federated partitioners: exact cover, reproducibility, label skew, shards, min_size and argument checks."""

import importlib
import re

import numpy as np
import pytest

from leantrain.data import dirichlet, iid, partition, shards
from leantrain.errors import ConfigError, LeantrainError

# The package re-exports the function `partition`, which shadows the submodule of the same name.
partition_module = importlib.import_module("leantrain.data.partition")

LABELS = np.random.default_rng(0).choice(10, size=2000, p=np.linspace(1, 3, 10) / np.linspace(1, 3, 10).sum())

CASES = [
    ("iid", {}, 7),
    ("iid", {}, 2000),
    ("dirichlet", {"alpha": 0.1}, 10),
    ("dirichlet", {"alpha": 100.0}, 25),
    ("dirichlet", {"alpha": 0.5, "min_size": 20}, 20),
    ("shards", {}, 10),
    ("shards", {"shards_per_client": 5}, 13),
]


@pytest.mark.parametrize(("scheme", "kwargs", "clients"), CASES)
def test_every_index_exactly_once(scheme, kwargs, clients):
    parts = partition(scheme, LABELS, clients, seed=1, **kwargs)
    assert len(parts) == clients and all(p.dtype == np.int64 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


@pytest.mark.parametrize(("scheme", "kwargs", "clients"), CASES)
def test_reproducible_from_seed_and_seed_matters(scheme, kwargs, clients):
    a, b = (partition(scheme, LABELS, clients, seed=3, **kwargs) for _ in range(2))
    c = partition(scheme, LABELS, clients, seed=4, **kwargs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def _mean_label_entropy(parts, labels) -> float:
    entropies = []
    for p in parts:
        freq = np.bincount(labels[p], minlength=10) / max(len(p), 1)
        freq = freq[freq > 0]
        entropies.append(-(freq * np.log(freq)).sum())
    return float(np.mean(entropies))


def test_small_alpha_gives_more_label_skew():
    skewed = _mean_label_entropy(dirichlet(LABELS, 10, alpha=0.05, seed=0), LABELS)
    near_iid = _mean_label_entropy(dirichlet(LABELS, 10, alpha=100.0, seed=0), LABELS)
    uniform = _mean_label_entropy(iid(len(LABELS), 10, seed=0), LABELS)
    assert skewed < near_iid - 0.5 and abs(near_iid - uniform) < 0.1


def test_min_size_is_respected_and_impossible_requests_fail(monkeypatch):
    assert min(map(len, dirichlet(LABELS, 20, alpha=0.3, seed=0))) < 40  # so the constraint below binds
    assert min(map(len, dirichlet(LABELS, 20, alpha=0.3, seed=0, min_size=40))) >= 40
    monkeypatch.setattr(partition_module, "MAX_DIRICHLET_DRAWS", 20)
    with pytest.raises(LeantrainError, match="raise alpha"):
        dirichlet(np.repeat(np.arange(10), 10), 10, alpha=0.01, min_size=10)


def test_shards_without_straddling_give_at_most_shards_per_client_labels():
    labels = np.repeat(np.arange(10), 20)  # 20 shards of 10 samples: each shard holds one label
    parts = shards(labels, num_clients=10, shards_per_client=2, seed=5)
    assert all(len(p) == 20 and len(np.unique(labels[p])) <= 2 for p in parts)
    assert sum(len(np.unique(labels[p])) == 2 for p in parts) >= 5  # dealing really mixes shards


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in iid(103, 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: iid(10, 0), "num_clients=0"),
        (lambda: iid(10, 11), "num_clients=11 is out of range; expected an integer in [1, 10]"),
        (lambda: dirichlet(LABELS, 5, alpha=0.0), "alpha=0.0"),
        (lambda: dirichlet(LABELS, 5, alpha=float("inf")), "alpha=inf"),
        (lambda: dirichlet(LABELS, 5, alpha=1.0, min_size=401), "min_size=401"),
        (lambda: dirichlet(np.array([0.5, 1.5]), 1, alpha=1.0), "labels must be"),
        (lambda: shards(LABELS, 10, shards_per_client=201), "shards_per_client=201"),
        (lambda: partition("pathological", LABELS, 5), "choices: iid, dirichlet, shards"),
        (lambda: partition("iid", LABELS, 5, alpha=1.0), "valid options: none"),
        (lambda: partition("dirichlet", LABELS, 5), "needs alpha"),
    ],
)
def test_bad_arguments_raise_config_error(call, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        call()


def test_partition_dispatches_to_the_named_scheme():
    direct = dirichlet(LABELS, 8, alpha=0.3, seed=2)
    via = partition("dirichlet", LABELS, 8, seed=2, alpha=0.3)
    assert all(np.array_equal(a, b) for a, b in zip(direct, via, strict=True))
