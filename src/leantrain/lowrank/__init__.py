"""Low-rank training (DRA, Dynamic Rank Adjustment, arXiv 2508.08625): factorized layers and effective rank."""

from leantrain.lowrank.factorized import LowRankConv2d, LowRankLinear, densify, factorize
from leantrain.lowrank.rank import effective_rank, effective_ranks

__all__ = ["LowRankConv2d", "LowRankLinear", "densify", "effective_rank", "effective_ranks", "factorize"]
