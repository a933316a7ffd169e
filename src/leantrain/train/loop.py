"""The small explicit training loop recipes use; methods plug in through its hooks.

Hooks later methods need:

- ``optimizer.step(closure)`` for optimizers that set ``requires_closure = True`` (SAM-style two-pass
  steps); others get the usual ``backward(); step()``. Only the closure's first call in a step updates
  BatchNorm running statistics.
- ``grad_transforms``: callables ``fn(model)`` run after every backward pass and before clipping (masking
  gradients, adding a regularizer's gradient, ...).
- ``callbacks``: objects with any of ``on_train_begin(trainer)``, ``on_step_end(trainer, metrics)``,
  ``on_epoch_end(trainer)``, ``on_train_end(trainer)``; a callback may set ``trainer.should_stop = True``.

Resuming from a checkpoint replays the same data order (batches come from ``(seed, epoch)``) and the same
RNG stream, so an interrupted and resumed run ends with the same weights as an uninterrupted one.
Ctrl-C finishes the current step, writes a checkpoint and stops; a NaN/inf loss stops before the optimizer
step so the last checkpoint on disk stays the last good state.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from leantrain.errors import NonFiniteLossError
from leantrain.optim import bn_stats_frozen
from leantrain.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from leantrain.train.interrupt import deferred_sigint
from leantrain.train.progress import NoProgress
from leantrain.train.tasks import Task


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C once the current step is done and a checkpoint is written."""

    def __init__(self, checkpoint: Path | None):
        super().__init__(f"interrupted; checkpoint at {checkpoint}")
        self.checkpoint = checkpoint


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based)
    batch_in_epoch: int = 0  # batches of that epoch already consumed
    elapsed_s: float = 0.0  # training wall time, summed over resumed sessions
    best_val: float | None = None


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Loss and task metric of ``model`` over ``batches`` in eval mode (its train mode is restored)."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    for batch in batches:
        _, stats = task.loss(model, batch)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
    model.train(was_training)
    return task.metrics(totals)


def total_steps(batches_per_epoch: int, epochs: int, max_steps: int | None) -> int:
    """``max_steps`` when set (it overrides ``epochs``, as in Hugging Face's Trainer), else all epochs' batches."""
    return max_steps if max_steps else batches_per_epoch * epochs


class Trainer:
    """Runs optimizer steps over ``train_batches`` with logging, evaluation and checkpoints."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        task: Task,
        train_batches: Iterable[dict[str, torch.Tensor]],
        *,
        epochs: int = 1,
        max_steps: int | None = None,
        lr_schedule: Callable[[int], float] | None = None,
        grad_clip: float | None = None,
        grad_transforms: Sequence[Callable[[nn.Module], None]] = (),
        callbacks: Sequence[object] = (),
        eval_batches: Iterable[dict[str, torch.Tensor]] | None = None,
        eval_every: int | None = None,
        log_every: int = 20,
        checkpoint_dir: Path | None = None,
        checkpoint_every: int | None = None,
        keep_checkpoints: int = 2,
        logger=None,
        progress=None,
    ):
        self.model, self.optimizer, self.task = model, optimizer, task
        self.train_batches, self.eval_batches = train_batches, eval_batches
        self.total_steps = total_steps(len(train_batches), epochs, max_steps)  # type: ignore[arg-type]
        self.lr_schedule, self.grad_clip = lr_schedule, grad_clip
        self.grad_transforms, self.callbacks = list(grad_transforms), list(callbacks)
        self.eval_every, self.log_every = eval_every, log_every
        self.checkpoint_dir, self.checkpoint_every, self.keep = checkpoint_dir, checkpoint_every, keep_checkpoints
        self.logger, self.progress = logger, progress or NoProgress()
        self.state = LoopState()
        self.should_stop = False
        self.last_checkpoint: Path | None = None
        self.last_val: tuple[int, dict[str, float]] | None = None  # (step, metrics) of the latest evaluation
        self.step_times: list[float] = []  # seconds of each optimizer step of this session (data loading included)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    # ------------------------------------------------------------ steps

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step; returns the batch's summed counts (loss_sum, count, ...)."""
        if self.lr_schedule is not None:
            factor = self.lr_schedule(self.state.step)
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
        counts: dict[str, float] = {}

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            # Re-evaluations within one step (SAM's perturbed pass, line searches) must not move BatchNorm's
            # running statistics a second time: only the first, unperturbed pass updates them.
            # (The restore happens after backward: autograd saved the statistics' tensors for it.)
            with bn_stats_frozen(self.model) if counts else contextlib.nullcontext():
                loss, stats = self.task.loss(self.model, batch)
                if not counts:
                    counts.update(stats)
                    if not math.isfinite(stats["loss_sum"]):
                        raise NonFiniteLossError(f"loss became {loss.item()} at step {self.state.step + 1}")
                loss.backward()
            for transform in self.grad_transforms:
                transform(self.model)
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            return loss

        if getattr(self.optimizer, "requires_closure", False):
            self.optimizer.step(closure)
        else:
            closure()
            self.optimizer.step()
        return counts

    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Loss and task metric over ``batches`` in eval mode."""
        return evaluate(self.model, self.task, batches)

    # ------------------------------------------------------------ the loop

    def fit(self, resume_from: Path | None = None) -> LoopState:
        """Train for ``total_steps`` optimizer steps, resuming from a checkpoint folder if given."""
        if resume_from is not None:
            meta = load_checkpoint(resume_from, self.model, self.optimizer)
            self.state = LoopState(**{k: meta[k] for k in asdict(LoopState()) if k in meta})
            self.last_checkpoint = resume_from
        self._call("on_train_begin")
        self.model.train()
        with deferred_sigint() as interrupted:
            while self.state.step < self.total_steps and not self.should_stop:
                self._run_epoch(interrupted)
        self._checkpoint()
        self._call("on_train_end")
        return self.state

    def _run_epoch(self, interrupted: threading.Event) -> None:
        st = self.state
        if hasattr(self.train_batches, "set_epoch"):
            self.train_batches.set_epoch(st.epoch)
        n_batches = len(self.train_batches)  # type: ignore[arg-type]
        window: dict[str, float] = {}
        tick = time.perf_counter()
        for i, batch in enumerate(self.train_batches):
            if i < st.batch_in_epoch:
                continue  # already trained on before the resume
            counts = self.train_step(batch)
            st.step, st.batch_in_epoch = st.step + 1, i + 1
            for key, value in counts.items():
                window[key] = window.get(key, 0.0) + value
            now = time.perf_counter()
            self.step_times.append(now - tick)
            st.elapsed_s += now - tick
            window["seconds"] = window.get("seconds", 0.0) + now - tick
            if st.step % self.log_every == 0 or st.step == self.total_steps:
                self._log_train(window)
                window = {}
            else:
                self.progress.advance(st.step)
            if self.eval_every and st.step % self.eval_every == 0 and i + 1 < n_batches:
                self._log_eval()
            self._call("on_step_end", counts)
            if self.checkpoint_every and st.step % self.checkpoint_every == 0 and i + 1 < n_batches:
                self._checkpoint()
            if interrupted.is_set():
                raise TrainingInterrupted(self._checkpoint())
            if st.step >= self.total_steps or self.should_stop:
                break
            tick = time.perf_counter()
        if st.batch_in_epoch >= n_batches:
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            self._log_eval()
            self._call("on_epoch_end")
            self._checkpoint()

    def _log_train(self, window: dict[str, float]) -> None:
        seconds = window.pop("seconds", 0.0)
        metrics = self.task.metrics(window)
        record = {"split": "train", "step": self.state.step, "epoch": self.state.epoch, **metrics}
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["samples_per_s"] = window.get("count", 0.0) / seconds if seconds > 0 else 0.0
        record["elapsed_s"] = self.state.elapsed_s
        if self.logger is not None:
            self.logger.log(record)
        self.progress.update(self.state.step, {"epoch": self.state.epoch, **metrics, "lr": record["lr"]})

    def _log_eval(self) -> dict[str, float] | None:
        if self.eval_batches is None:
            return None
        metrics = self.evaluate(self.eval_batches)
        self.last_val = (self.state.step, metrics)
        value = metrics[self.task.metric_name]
        best = self.state.best_val
        if best is None or (value > best if self.task.higher_is_better else value < best):
            self.state.best_val = value
        record = {"split": "val", "step": self.state.step, "epoch": self.state.epoch, **metrics}
        record["elapsed_s"] = self.state.elapsed_s
        if self.logger is not None:
            self.logger.log(record)
        self.progress.message(
            f"val @ step {self.state.step}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        )
        return metrics

    def _checkpoint(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        existing = list_checkpoints(self.checkpoint_dir)
        if existing and existing[-1].name == f"step-{self.state.step:08d}":
            saved = json.loads((existing[-1] / "state.json").read_text())
            if all(saved.get(k) == v for k, v in asdict(self.state).items()):
                self.last_checkpoint = existing[-1]  # nothing changed since it was written
                return self.last_checkpoint
        self.last_checkpoint = save_checkpoint(
            self.checkpoint_dir, self.model, self.optimizer, asdict(self.state), keep=self.keep
        )
        return self.last_checkpoint

    def _call(self, event: str, *args) -> None:
        for cb in self.callbacks:
            hook = getattr(cb, event, None)
            if hook is not None:
                hook(self, *args)
