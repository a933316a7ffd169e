"""Training across fast and slow devices: biased local SGD on torch.distributed (arXiv 2508.08540).

See docs/hetero.md. :class:`HeteroTrainer` runs ``sync`` (synchronous SGD, DDP), ``local-uniform`` (local SGD with
one period) or ``biased`` (steps in proportion to speed, biased aggregation and sampling) on any classifier, in one
process (virtual clock) or one process per worker (``leantrain.process_group.launch`` or ``torchrun``).
"""

from leantrain.hetero.clock import VirtualClock, WallClock
from leantrain.hetero.methods import METHODS, Method, make_method
from leantrain.hetero.sampling import LossScores, block_rows
from leantrain.hetero.schedule import aggregation_weights, proportional_steps, slow_workers
from leantrain.hetero.trainer import HeteroTrainer, weighted_average

__all__ = [
    "METHODS",
    "HeteroTrainer",
    "LossScores",
    "Method",
    "VirtualClock",
    "WallClock",
    "aggregation_weights",
    "block_rows",
    "make_method",
    "proportional_steps",
    "slow_workers",
    "weighted_average",
]
