"""ArrayBatches: exact coverage per epoch, (seed, epoch) determinism, drop_last, padding-aware trimming."""

import numpy as np
import pytest
import torch

from leantrain.data import ArrayBatches
from leantrain.errors import ConfigError


def _arrays(n=23):
    return {"x": np.arange(n * 3, dtype=np.float32).reshape(n, 3), "idx": np.arange(n, dtype=np.int64)}


def _order(batches):
    return torch.cat([b["idx"] for b in batches]).tolist()


def test_each_sample_once_per_epoch_and_rows_stay_aligned():
    loader = ArrayBatches(_arrays(), batch_size=5, shuffle=True, seed=1)
    seen = []
    for batch in loader:
        assert batch["x"].dtype == torch.float32 and batch["idx"].dtype == torch.int64
        assert torch.equal(batch["x"][:, 0], batch["idx"].float() * 3)
        seen += batch["idx"].tolist()
    assert sorted(seen) == list(range(23)) and len(loader) == 5


def test_order_depends_only_on_seed_and_epoch():
    a, b = (ArrayBatches(_arrays(), 4, shuffle=True, seed=7) for _ in range(2))
    a.set_epoch(3)
    b.set_epoch(3)
    assert _order(a) == _order(b) == _order(a)
    b.set_epoch(4)
    assert _order(a) != _order(b)
    other_seed = ArrayBatches(_arrays(), 4, shuffle=True, seed=8)
    other_seed.set_epoch(3)
    assert _order(other_seed) != _order(a)


def test_no_shuffle_is_natural_order_and_zero_copy():
    arrays = _arrays()
    loader = ArrayBatches(arrays, 10)
    assert _order(loader) == list(range(23))
    assert loader.tensors["x"].data_ptr() == arrays["x"].__array_interface__["data"][0]


@pytest.mark.parametrize(("drop_last", "sizes"), [(False, [4, 4, 2]), (True, [4, 4])])
def test_drop_last(drop_last, sizes):
    loader = ArrayBatches(_arrays(10), 4, shuffle=True, drop_last=drop_last)
    assert len(loader) == len(sizes) and [len(b["idx"]) for b in loader] == sizes


def test_trimming_cuts_to_longest_and_masks_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 17, size=50)
    ids = np.zeros((50, 16), dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(5, 100, size=n)
    loader = ArrayBatches(
        {"input_ids": ids, "idx": np.arange(50)}, 8, shuffle=True, trim_key="input_ids", lengths=lengths
    )
    for batch in loader:
        rows = batch["idx"].numpy()
        assert batch["input_ids"].shape[1] == lengths[rows].max()
        assert batch["attention_mask"].dtype == torch.int64
        assert batch["attention_mask"].sum(1).tolist() == lengths[rows].tolist()
        assert torch.equal(batch["input_ids"], torch.from_numpy(ids[rows, : lengths[rows].max()]))
        assert bool((batch["input_ids"][batch["attention_mask"] == 0] == 0).all())


def test_trimming_without_mask_key():
    ids, lengths = np.ones((4, 6), dtype=np.int64), np.array([1, 2, 3, 2])
    batch = next(iter(ArrayBatches({"ids": ids}, 2, trim_key="ids", lengths=lengths, pad_mask_key=None)))
    assert set(batch) == {"ids"} and batch["ids"].shape == (2, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arrays": _arrays(), "batch_size": 0}, "batch_size=0"),
        ({"arrays": {"a": np.zeros(3), "b": np.zeros(4)}, "batch_size": 2}, "share their first dimension"),
        ({"arrays": {"t": np.array(["a", "b"])}, "batch_size": 2}, "tokenise texts"),
        ({"arrays": _arrays(), "batch_size": 2, "trim_key": "x"}, "both trim_key and lengths"),
        ({"arrays": _arrays(), "batch_size": 2, "trim_key": "idx", "lengths": np.ones(23)}, "2-D array"),
        ({"arrays": _arrays(), "batch_size": 2, "trim_key": "x", "lengths": np.full(23, 4)}, r"\[1, 3\]"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ArrayBatches(**kwargs)
