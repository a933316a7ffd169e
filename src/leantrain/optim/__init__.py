"""Optimizers that plug into leantrain's training loop."""

from leantrain.optim.sam import SAM, bn_stats_frozen

__all__ = ["SAM", "bn_stats_frozen"]
