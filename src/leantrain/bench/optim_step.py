"""One timed optimizer step on a shipped ``<name>-resnet20-fashion-mnist`` recipe.

Shared by the step-time part of ``bench optim`` (:mod:`leantrain.bench.optim`, all optimizers in one process) and
the AsyncSAM two-process settings (:mod:`leantrain.bench.optim_async`, one fresh process per setting).
"""

from __future__ import annotations

import time

import torch


def setup(name: str, overrides: list[str]):
    """(model, optimizer, training batches, task) of ``<name>-resnet20-fashion-mnist`` with ``overrides``."""
    from leantrain.config import resolve
    from leantrain.models.build import build_model_for_data
    from leantrain.runs.supervised import build_optimizer, prepare_data
    from leantrain.train.tasks import TASKS

    cfg = resolve(f"{name}-resnet20-fashion-mnist", ["data.train_subset=1280", *overrides])
    torch.manual_seed(0)
    data = prepare_data(cfg)
    model = build_model_for_data(cfg.model.name, cfg.model.options, data.model_fields)
    task = TASKS[data.task]()
    opt = build_optimizer(cfg, model, steps_per_epoch=len(data.train), train=data.train, task=task)
    data.train.set_epoch(0)
    return model, opt, list(data.train), task


def one_step(model, opt, task, batch) -> float:
    """Wall time of one optimizer step (forward, backward(s), update) on ``batch``."""
    start = time.perf_counter()

    def closure():
        opt.zero_grad(set_to_none=True)
        loss, _ = task.loss(model, batch)
        loss.backward()
        return loss

    if getattr(opt, "requires_closure", False):
        opt.step(closure)
    else:
        closure()
        opt.step()
    return time.perf_counter() - start


def cycle(batches):
    """The batches over and over (step-time loops run past the end of a small training subset)."""
    while True:
        yield from batches
