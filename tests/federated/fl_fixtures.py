"""Tiny data and models for the federated tests."""

import numpy as np
import torch
from torch import nn

from leantrain.federated.simulator import FederatedData


def tiny_data(num_clients=4, per_client=24, seed=0, dim=6, classes=3):
    """Linearly separable-ish rows split into equal contiguous client parts."""
    g = torch.Generator().manual_seed(seed)
    n = num_clients * per_client
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    y = (x @ w).argmax(1)
    xt = torch.randn(60, dim, generator=g)
    yt = (xt @ w).argmax(1)
    parts = [np.arange(i * per_client, (i + 1) * per_client) for i in range(num_clients)]
    return FederatedData({"x": x, "labels": y}, {"x": xt, "labels": yt}, parts, classes, (dim,))


def tiny_model(dim=6, classes=3):
    return nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, classes))
