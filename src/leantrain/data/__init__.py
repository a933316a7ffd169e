"""Offline data registry: datasets shipped by installed packages, batching, text tokenisation, federated splits.

Nothing here touches the network. ``load_dataset(name)`` decodes a packaged source once into
``.npy`` files under ``$LEANTRAIN_CACHE/datasets/<name>`` and returns a :class:`Dataset` with
deterministic train/val/test splits; ``list_datasets()`` names what is available. ``ArrayBatches``
batches in-memory arrays reproducibly, ``tokenize_texts``/``lm_blocks`` prepare text, and
``partition``/``iid``/``dirichlet``/``shards`` split sample indices among federated clients. See docs/data.md.

``ArrayBatches`` (torch tensors) is imported on first use: listing and loading datasets needs numpy only, and
importing torch would add over a second to ``leantrain list``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from leantrain.data.dataset import Dataset, Split
from leantrain.data.partition import dirichlet, iid, partition, shards
from leantrain.data.registry import dataset_options, list_datasets, load_dataset
from leantrain.data.text import TokenizedTexts, lm_blocks, tokenize_texts

if TYPE_CHECKING:
    from leantrain.data.loaders import ArrayBatches

_LAZY = {"ArrayBatches": "leantrain.data.loaders"}  # name -> defining module (imports torch)

__all__ = [
    "ArrayBatches",
    "Dataset",
    "Split",
    "TokenizedTexts",
    "dataset_options",
    "dirichlet",
    "iid",
    "list_datasets",
    "lm_blocks",
    "load_dataset",
    "partition",
    "shards",
    "tokenize_texts",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
