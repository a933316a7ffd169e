"""Decoded copies of raw dataset sources, kept as ``.npy`` files under ``cache_dir("datasets", name)``.

Every raw source (CSV, idx ``.gz``, packaged pickles, generated signals, tokenised text) is decoded
once; later loads read the ``.npy`` files with ``allow_pickle=False``. Files are written to a
temporary name and then ``os.replace``-d, so a crash or a concurrent writer never leaves a truncated
file under the final name. Delete ``$LEANTRAIN_CACHE/datasets/<name>`` to force a rebuild.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from leantrain.cache import cache_dir


def dataset_cache(name: str) -> Path:
    """Folder holding the decoded arrays of dataset ``name`` (created if needed)."""
    return cache_dir("datasets", name)


def save_array(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    if array.dtype.hasobject:
        raise TypeError(f"refusing to cache an object array at {path}: it would need pickle")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_array(path: Path) -> np.ndarray:
    """Read one cached array; never unpickles."""
    return np.load(path, allow_pickle=False)


def cached_arrays(name: str, keys: Sequence[str], build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return the arrays ``keys`` of dataset ``name``, from the cache or by calling ``build`` once and caching.

    ``build`` must return exactly the dtypes that are stored, so a cold and a warm load give
    identical arrays.
    """
    folder = dataset_cache(name)
    paths = {key: folder / f"{key}.npy" for key in keys}
    if all(p.exists() for p in paths.values()):
        try:
            return {key: load_array(p) for key, p in paths.items()}
        except (OSError, ValueError, EOFError):
            pass  # unreadable (e.g. written by an incompatible numpy): rebuild below
    arrays = build()
    missing = set(keys) - set(arrays)
    if missing:
        raise KeyError(f"builder for {name!r} did not return {sorted(missing)}")
    for key, path in paths.items():
        save_array(path, arrays[key])
    return {key: arrays[key] for key in keys}
