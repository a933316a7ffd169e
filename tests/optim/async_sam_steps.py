"""Shared by the AsyncSAM tests: a toy dataset, and training on consecutive row slices, one ``step(closure)`` each."""

import torch

from leantrain.train import ClassificationTask


def rows(n=96) -> dict[str, torch.Tensor]:
    """A fixed 3-class toy dataset: 5 features, labels from the signs of the first two."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 5, generator=g)
    return {"x": x, "labels": (x[:, 0] > 0).long() + (x[:, 1] > 0).long()}


def train_steps(model, opt, rows, steps=5, batch=16) -> list[float]:
    """``steps`` optimizer steps on consecutive ``batch``-row slices of ``rows``; the first-pass losses.

    The descent's dropout masks are seeded per step (``100 + i``), so two optimizers see the same masks.
    """
    losses = []
    for i in range(steps):
        b = {k: v[i * batch : (i + 1) * batch] for k, v in rows.items()}

        def closure(b=b):
            opt.zero_grad()
            loss = ClassificationTask().loss(model, b)[0]
            loss.backward()
            return loss

        torch.manual_seed(100 + i)
        losses.append(opt.step(closure).item())
    return losses
