"""How many local steps each worker takes in a synchronisation period, and how much its model counts in the average.

Biased local SGD (Lim, Jo, Ko, Go, Hwa, Lee: "Biased Local SGD for Efficient Deep Learning on Heterogeneous
Systems", arXiv 2508.08540; official code jjihyunh/BiasedLocalSGD) gives each device work in proportion to its
speed, so that every worker reaches the averaging point at the same time: the fastest takes ``period_steps``
(the code's ``GPU_interval``, 32) local steps, a worker ``s`` times slower the steps that fit in the same time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from leantrain.errors import ConfigError


def check_slowdowns(slowdowns: Sequence[float]) -> list[float]:
    """The per-worker slowdowns (time of one step relative to a speed-1 worker) as floats; clear errors otherwise."""
    if isinstance(slowdowns, str | bytes) or not isinstance(slowdowns, Sequence) or not slowdowns:
        raise ConfigError(f"slowdowns={slowdowns!r} is invalid; expected one factor >= 1 per worker, e.g. [1, 4]")
    out = []
    for j, s in enumerate(slowdowns):
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s < 1:
            raise ConfigError(f"slowdowns[{j}]={s!r} is invalid; expected a number >= 1 (1: full speed, 4: 4x slower)")
        out.append(float(s))
    return out


def proportional_steps(slowdowns: Sequence[float], period_steps: int) -> list[int]:
    """Local steps per worker in one period: the steps worker j fits into the time the fastest worker needs for
    ``period_steps`` steps, ``floor(period_steps * s_min / s_j)``, at least 1 (the paper: H proportional to the
    measured throughput; the code's defaults are 32 for a GPU and 1 for a CPU)."""
    slowdowns = check_slowdowns(slowdowns)
    if isinstance(period_steps, bool) or not isinstance(period_steps, int) or period_steps < 1:
        raise ConfigError(f"period_steps={period_steps!r} is invalid; expected an integer >= 1")
    fastest = min(slowdowns)
    return [max(1, math.floor(period_steps * fastest / s + 1e-9)) for s in slowdowns]


def aggregation_weights(steps: Sequence[int], beta: float) -> list[float]:
    """Weights of the workers' models in the average: ``w_j ∝ H_j ** beta``, summing to 1.

    ``beta = 0``: equal weights, what the official code does (``average_model`` sums every worker's state and
    divides by the number of workers), which over-weights the slow workers' models relative to the work they did:
    the paper's biased aggregation. ``beta = 1``: weights proportional to the steps taken (unbiased).
    """
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not math.isfinite(beta):
        raise ConfigError(f"beta={beta!r} is invalid; expected a number (0: equal weights, 1: by steps)")
    raw = [float(h) ** beta for h in steps]
    total = sum(raw)
    return [r / total for r in raw]


def slow_workers(steps: Sequence[int]) -> list[int]:
    """The workers that take fewer local steps than the fastest (the paper's CPUs); empty when all are equal."""
    most = max(steps)
    return [j for j, h in enumerate(steps) if h < most]
