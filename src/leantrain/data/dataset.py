"""The in-memory dataset record every leantrain loader returns: three splits plus metadata.

Arrays are plain numpy so models, federated partitioners and benchmarks share one format:
images are float32 ``(N, C, H, W)`` in [0, 1], vectors float32 ``(N, D)``, texts a numpy unicode
array ``(N,)``, and language-model corpora a 1-D int64 array of token ids. Labels are int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leantrain.errors import ConfigError

KINDS = ("image", "vector", "text", "lm")


# eq=False: the fields are numpy arrays, so a generated __eq__ would raise on `split_a == split_b`.
@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset: inputs ``x`` and int64 labels ``y`` (``None`` for language modelling)."""

    x: np.ndarray
    y: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.y is not None and len(self.y) != len(self.x):
            raise ConfigError(f"Split.y has {len(self.y)} labels, Split.x has {len(self.x)} samples; make them equal")

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A named dataset with train/val/test splits and what a model needs to know about it."""

    name: str
    kind: str
    train: Split
    val: Split
    test: Split
    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    classes: tuple[str, ...] | None = None
    vocab: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"Dataset.kind={self.kind!r} is not one of {', '.join(KINDS)}")

    @property
    def vocab_size(self) -> int | None:
        """Size of the id -> character table for char-level corpora; ``None`` otherwise."""
        return None if self.vocab is None else len(self.vocab)
