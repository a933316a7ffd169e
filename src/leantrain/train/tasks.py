"""What a training step computes: a loss on a batch plus the counts its metric is made of.

A task turns a batch (a dict of tensors) into a loss. Batches with an ``x`` entry call ``model(x)``; token
batches call ``model(input_ids=..., attention_mask=...)``, so plain modules and Hugging Face models work
the same way. Outputs with a ``.logits`` attribute (transformers) are unwrapped.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


def model_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Call ``model`` on a batch and return its logits."""
    if "x" in batch:
        out = model(batch["x"])
    else:
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return getattr(out, "logits", out)


class Task(Protocol):
    metric_name: str
    higher_is_better: bool

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss over the batch and additive counts (``loss_sum``, ``count``, ...) for the metric."""
        ...

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Turn summed counts into named metrics (``loss`` and the task metric)."""
        ...


class ClassificationTask:
    """Cross-entropy over ``labels`` (B,); metric: accuracy."""

    metric_name = "accuracy"
    higher_is_better = True

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model_logits(model, batch)  # (B, num_classes)
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels)
        correct = (logits.argmax(-1) == labels).sum().item()
        n = labels.numel()
        return loss, {"loss_sum": loss.item() * n, "correct": correct, "count": n}

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        n = max(totals.get("count", 0), 1)
        return {"loss": totals["loss_sum"] / n, "accuracy": totals["correct"] / n}


class LanguageModelingTask:
    """Next-token cross-entropy over ``labels`` (B, T); metric: perplexity (exp of the mean token loss)."""

    metric_name = "perplexity"
    higher_is_better = False

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model_logits(model, batch)  # (B, T, V)
        labels = batch["labels"]  # (B, T)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
        n = labels.numel()
        return loss, {"loss_sum": loss.item() * n, "count": n}

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        mean = totals["loss_sum"] / max(totals.get("count", 0), 1)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


TASKS = {"classification": ClassificationTask, "language-modeling": LanguageModelingTask}
