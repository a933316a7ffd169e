"""Sparse and partial-connection fine-tuning: GEM (arXiv 2508.16191) and PaCA / QPaCA (arXiv 2503.01905).

The core modules (:mod:`leantrain.finetune.gem`, :mod:`leantrain.finetune.paca`) are plain PyTorch. The
PEFT-facing names (``GemConfig``, ``PacaConfig``, ``apply_gem``) live in :mod:`leantrain.finetune.peft_tuners`
and are loaded on first use, so importing this package does not import PEFT.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "GemConfig": "leantrain.finetune.peft_tuners.gem",
    "GemModel": "leantrain.finetune.peft_tuners.gem",
    "apply_gem": "leantrain.finetune.peft_tuners.gem",
    "PacaConfig": "leantrain.finetune.peft_tuners.paca",
    "PacaModel": "leantrain.finetune.peft_tuners.paca",
    "compute_gem_masks": "leantrain.finetune.gem",
    "GemMaskResult": "leantrain.finetune.gem",
    "PacaLinear": "leantrain.finetune.paca",
    "PacaPeftLinear": "leantrain.finetune.peft_tuners.paca",
    "default_target_modules": "leantrain.finetune.target_modules",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
