"""Optimizers that plug into leantrain's training loop: SAM / ASAM, layer-wise SAM, AsyncSAM and mL-BFGS."""

from leantrain.optim.ascent_worker import Ascent
from leantrain.optim.async_sam import AsyncSAM
from leantrain.optim.lwsam import LayerwiseSAM
from leantrain.optim.mlbfgs import MLBFGS, damp_curvature_pair
from leantrain.optim.sam import SAM, bn_stats_frozen
from leantrain.optim.sam_step import maybe_no_sync, sam_training_step

__all__ = [
    "MLBFGS",
    "SAM",
    "Ascent",
    "AsyncSAM",
    "LayerwiseSAM",
    "bn_stats_frozen",
    "damp_curvature_pair",
    "maybe_no_sync",
    "sam_training_step",
]
