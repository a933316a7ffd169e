"""The ways to train across workers of different speed, by name (``hetero.method``): one registry, three entries.

- ``sync``: synchronous data-parallel SGD (torch ``DistributedDataParallel`` when each process holds one worker):
  every step averages the workers' gradients, so every step waits for the slowest worker.
- ``local-uniform``: local SGD with one period for everyone (what torch ``PeriodicModelAverager`` /
  ``PostLocalSGDOptimizer``, ``accelerate``'s LocalSGD and torchft do): every worker takes ``period_steps`` local
  steps, then the models are averaged with equal weights; the slowest worker gates every round.
- ``biased``: biased local SGD (Lim et al., arXiv 2508.08540): steps in proportion to speed
  (:func:`~leantrain.hetero.schedule.proportional_steps`), models averaged with weights ``H_j ** beta``
  (``beta = 0``, equal weights, the official code's biased aggregation; ``beta = 1``, by steps), and the slow workers
  fed the highest-loss rows (``biased_sampling``, the code's ``biased = 1``; :mod:`leantrain.hetero.sampling`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from leantrain.errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    every_step: bool = False  # gradients averaged every step (synchronous SGD)
    proportional: bool = False  # local steps in proportion to speed (else period_steps for every worker)
    beta: float = 0.0  # aggregation weights ∝ H_j ** beta
    biased_sampling: bool = False  # the slow workers read the highest-loss rows
    pool_ratio: float = 4.0  # candidate pool size / the slow workers' need (biased sampling)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sync", "synchronous SGD: gradients averaged every step (DDP)", every_step=True),
        Method("local-uniform", "local SGD, period_steps for every worker, equal-weight model average"),
        Method(
            "biased",
            "biased local SGD: steps ∝ speed, weights H^beta, high-loss rows to slow workers",
            proportional=True,
            beta=0.0,
            biased_sampling=True,
        ),  # fmt: skip
    )
}

_TUNABLE = {"biased": ("beta", "biased_sampling", "pool_ratio")}


def make_method(name: str, **options) -> Method:
    """The method ``name`` with ``options`` (biased: ``beta``, ``biased_sampling``, ``pool_ratio``)."""
    if name not in METHODS:
        raise ConfigError(f"unknown hetero method {name!r}; choose one of {', '.join(METHODS)}")
    allowed = _TUNABLE.get(name, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) or "none"
        raise ConfigError(f"hetero method {name!r} has no option {', '.join(map(repr, unknown))}; options: {valid}")
    method = dataclasses.replace(METHODS[name], **options)
    if not isinstance(method.biased_sampling, bool):
        raise ConfigError(f"biased_sampling={method.biased_sampling!r} is invalid; expected true or false")
    if isinstance(method.pool_ratio, bool) or not isinstance(method.pool_ratio, int | float) or method.pool_ratio < 1:
        raise ConfigError(f"pool_ratio={method.pool_ratio!r} is invalid; expected a number >= 1")
    return method
