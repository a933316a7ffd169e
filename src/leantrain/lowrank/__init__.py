"""Low-rank training (DRA, Dynamic Rank Adjustment, arXiv 2508.08625): factorized layers, the adapter form,
the phase schedule, effective rank and analytic training cost."""

from leantrain.lowrank.adapter import LowRankAdapter
from leantrain.lowrank.cost import TrainingCost, training_macs
from leantrain.lowrank.dynamic_rank import DynamicRankSchedule, official_events
from leantrain.lowrank.factorized import LowRankConv2d, LowRankLinear, densify, factorize, select_layers
from leantrain.lowrank.rank import EffectiveRankLogger, effective_rank, effective_ranks

__all__ = [
    "DynamicRankSchedule",
    "EffectiveRankLogger",
    "LowRankAdapter",
    "LowRankConv2d",
    "LowRankLinear",
    "TrainingCost",
    "densify",
    "effective_rank",
    "effective_ranks",
    "factorize",
    "official_events",
    "select_layers",
    "training_macs",
]
