"""Optimizers by name, for recipes: ``optim.name`` picks a builder registered here.

A builder turns the recipe's ``optim`` section (any object with its fields: lr, momentum, rho, ...) and the
trainable parameters into a ``torch.optim.Optimizer``. The sharpness-aware ones wrap ``optim.base`` (sgd, adamw or
adam). Register another with :func:`register_optimizer`; the config accepts every registered name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from leantrain.registry import Registry

BASE_OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


@dataclass
class OptimizerRequest:
    """What a builder gets: the recipe's ``optim`` section, the model, its trainable parameters, the epoch length
    (LW-SAM re-selects its layers every epoch by default), AsyncSAM's ascent data (or None) and the learning-rate
    warm-up length (LW-SAM chooses its first layers after it by default)."""

    options: object
    model: nn.Module
    params: list[torch.Tensor]
    steps_per_epoch: int = 1
    ascent: object = None
    warmup_steps: int = 0


OptimizerBuilder = Callable[[OptimizerRequest], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")
register_optimizer = OPTIMIZERS.register


def base_kwargs(o, base: str) -> dict:
    """The torch optimizer keywords of ``base`` taken from the options."""
    if base == "sgd":
        return {"lr": o.lr, "momentum": o.momentum, "nesterov": o.nesterov, "weight_decay": o.weight_decay}
    return {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}


for _name, _cls in BASE_OPTIMIZERS.items():
    register_optimizer(_name)(lambda r, name=_name, cls=_cls: cls(r.params, **base_kwargs(r.options, name)))


@register_optimizer("sam")
def _sam(r: OptimizerRequest) -> torch.optim.Optimizer:
    from leantrain.optim.sam import SAM

    o = r.options
    return SAM(r.params, base_optimizer=BASE_OPTIMIZERS[o.base], rho=o.rho, adaptive=o.adaptive, model=r.model,
               adaptive_form=o.adaptive_form, adaptive_eta=o.adaptive_eta, **base_kwargs(o, o.base))  # fmt: skip


@register_optimizer("lwsam")
def _lwsam(r: OptimizerRequest) -> torch.optim.Optimizer:
    from leantrain.optim.lwsam import LayerwiseSAM

    o = r.options
    select_after = r.warmup_steps if o.select_after is None else o.select_after
    return LayerwiseSAM(r.model, base_optimizer=BASE_OPTIMIZERS[o.base], rho=o.rho, num_layers=o.num_layers,
                        reselect_every=o.reselect_every or r.steps_per_epoch, select_after=select_after,
                        second_pass=o.second_pass, **base_kwargs(o, o.base))  # fmt: skip


@register_optimizer("asyncsam")
def _asyncsam(r: OptimizerRequest) -> torch.optim.Optimizer:
    """``optim.mode: auto`` is resolved here: two processes when a second core is available, else sequential, where
    an ascent batch sized by the two-process rule (``ascent_batch_size`` unset) falls back to the descent batch."""
    from leantrain.optim.async_sam import AsyncSAM, resolve_mode

    o = r.options
    mode, ascent = resolve_mode(o.mode, o.staleness), r.ascent
    if mode == "sequential" and ascent is not None and ascent.batch_size == "auto":
        ascent = None
    return AsyncSAM(r.params, base_optimizer=BASE_OPTIMIZERS[o.base], rho=o.rho, staleness=o.staleness,
                    adaptive=o.adaptive, model=r.model, ascent=ascent, mode=mode, on_miss=o.on_miss,
                    slowdown=o.slowdown, worker_cpu=o.worker_cpu, adaptive_form=o.adaptive_form,
                    adaptive_eta=o.adaptive_eta, **base_kwargs(o, o.base))  # fmt: skip


@register_optimizer("mlbfgs")
def _mlbfgs(r: OptimizerRequest) -> torch.optim.Optimizer:
    from leantrain.optim.mlbfgs import MLBFGS

    o = r.options
    return MLBFGS(r.params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, beta_param=o.beta,
                  beta_grad=o.beta, beta_pair=o.beta_pair, update_freq=o.update_freq, history_size=o.history_size,
                  damping=o.damping, direction_scaling=o.direction_scaling, kl_clip=o.kl_clip)  # fmt: skip


def build_optimizer(request: OptimizerRequest, name: str) -> torch.optim.Optimizer:
    return OPTIMIZERS.pick(name)(request)
