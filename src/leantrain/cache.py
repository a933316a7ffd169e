"""Where leantrain keeps derived files (decoded datasets, dequantised weights): ~/.cache/leantrain.

Override with the LEANTRAIN_CACHE environment variable. Nothing here is ever downloaded: the cache
only holds conversions of files that installed packages ship.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Return (and create) ``$LEANTRAIN_CACHE/<parts...>``, defaulting to ``~/.cache/leantrain``."""
    root = Path(os.environ.get("LEANTRAIN_CACHE") or Path.home() / ".cache" / "leantrain")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
