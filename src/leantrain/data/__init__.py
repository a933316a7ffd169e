"""Offline data registry: datasets shipped by installed packages, batching, text tokenisation, federated splits.

Nothing here touches the network. ``load_dataset(name)`` decodes a packaged source once into
``.npy`` files under ``$LEANTRAIN_CACHE/datasets/<name>`` and returns a :class:`Dataset` with
deterministic train/val/test splits; ``list_datasets()`` names what is available. ``ArrayBatches``
batches in-memory arrays reproducibly, ``tokenize_texts``/``lm_blocks`` prepare text, and
``partition``/``iid``/``dirichlet``/``shards`` split sample indices among federated clients. See docs/data.md.
"""

from leantrain.data.dataset import Dataset, Split
from leantrain.data.loaders import ArrayBatches
from leantrain.data.partition import dirichlet, iid, partition, shards
from leantrain.data.registry import dataset_options, list_datasets, load_dataset
from leantrain.data.text import TokenizedTexts, lm_blocks, tokenize_texts

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
