"""Tiny data and models for the hetero tests, and the module-level worker functions spawned processes run."""

import os
import time

import torch
from torch import nn

from leantrain.hetero import HeteroTrainer, make_method

N, D, C = 384, 10, 3


def tiny_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(D, C, generator=g)
    return x, (x @ w).argmax(1)


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C))


def trainer(method: str = "biased", slowdowns=(1, 4), options=None, **kw) -> HeteroTrainer:
    x, y = tiny_rows()
    kw = {"period_steps": 4, "batch_size": 8, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, **kw}
    return HeteroTrainer(tiny_model, x, y, make_method(method, **(options or {})), list(slowdowns), **kw)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_rounds(method: str, slowdowns, rounds: int, options=None, **kw) -> tuple[torch.Tensor, HeteroTrainer]:
    t = trainer(method, slowdowns, options, **kw)
    for _ in range(rounds):
        t.train_round()
    return flat_params(t.models[0]), t


# ---------------------------------------------------------------------------- spawned ranks (module level)


def follower_rounds(rank: int, size: int, method: str, slowdowns, rounds: int, options, kw) -> None:
    t = trainer(method, slowdowns, options, **kw)
    for _ in range(rounds):
        t.train_round()
    t.worker_stats()  # rank 0 gathers too


def dies_after_one_round(rank: int, size: int) -> None:
    t = trainer("biased", (1, 4))
    t.train_round()
    os._exit(3)


def stops_answering(rank: int, size: int) -> None:
    trainer("biased", (1, 4))
    time.sleep(60)
