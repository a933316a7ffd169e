"""The ``lowrank:`` section of a run config turned into model surgery and loop callbacks (used by ``leantrain run``).

``training: full`` logs the effective rank of the target layers of a dense run (the full-rank baseline),
``fixed`` factorizes them once before training, ``dynamic`` runs DRA's schedule. ``target_layers`` are fnmatch
patterns over module names (``blocks.*`` for every conv of a ResNet's residual blocks).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from leantrain.errors import ConfigError
from leantrain.lowrank.dynamic_rank import DynamicRankSchedule, OptimizerFactory, dra_events, official_events
from leantrain.lowrank.factorized import LayerSelector, factorize, select_layers
from leantrain.lowrank.rank import EffectiveRankLogger


def layer_patterns(patterns: Sequence[str]) -> LayerSelector | None:
    """A predicate matching module names against fnmatch ``patterns``; None (the default set) when empty."""
    if not patterns:
        return None
    return lambda name, _module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def schedule_events(cfg, epochs: int) -> list[tuple[int, str]]:
    """DRA's events from ``lowrank.switch_epochs`` (or the official fractions of ``epochs``) and ``deflate``."""
    if not cfg.switch_epochs:
        return official_events(epochs, cfg.deflate)
    return dra_events(*cfg.switch_epochs, cfg.deflate)


def lowrank_callbacks(
    cfg, model: nn.Module, epochs: int, start_epoch: int, optimizer_factory: OptimizerFactory
) -> tuple[list[object], dict]:
    """Prepare ``model`` for ``cfg.training`` at ``start_epoch`` (in place); return loop callbacks and a summary.

    Call it before building the optimizer: the target layers may be replaced.
    """
    if cfg.training == "none":
        return [], {}
    selector = layer_patterns(cfg.target_layers)
    info: dict = {"training": cfg.training, "rank_ratio": cfg.rank_ratio}
    if cfg.training == "dynamic":
        schedule = DynamicRankSchedule(
            schedule_events(cfg, epochs), rank_ratio=cfg.rank_ratio, layers=selector, alpha=cfg.adapter_alpha,
            init=cfg.factor_init, optimizer_factory=optimizer_factory,
        )  # fmt: skip
        schedule.apply(model, start_epoch)
        info.update(events=[list(e) for e in schedule.events], target_layers=schedule.target_layers)
        return [schedule, EffectiveRankLogger(lambda: schedule.target_layers)], info
    if cfg.training == "fixed":
        names = factorize(model, cfg.rank_ratio, selector, init=cfg.factor_init)
    else:
        names = list(select_layers(model, selector, cfg.rank_ratio))
        if not names:
            raise ConfigError(f"config: lowrank.target_layers={list(cfg.target_layers)!r} matches no layer")
    info["target_layers"] = names
    return [EffectiveRankLogger(names)], info
