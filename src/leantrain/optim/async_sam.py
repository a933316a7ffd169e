"""AsyncSAM (Asynchronous Sharpness-Aware Minimization, arXiv 2503.11147): SAM with a stale perturbation.

SAM's ascent (the perturbation ε = ρ·g/‖g‖) and descent (the gradient at w + ε) are sequential. AsyncSAM builds
ε from a gradient ``staleness`` steps old, w_{t+1} = w_t − η·∇L_{B_t}(w_t + ρ·ĝ_{t−τ}), so the ascent can run
concurrently on an otherwise idle, slower device and a step costs about what SGD's does. τ = 1 in the paper;
τ = 0 is SAM.

Three ways to run it, the same math:

- ``mode="sequential"`` without ``ascent``: each ``step(closure)`` computes the gradient at w_t with the closure
  (the returned loss; queued as the ascent of step t + τ), perturbs with the ascent queued τ steps earlier,
  evaluates the closure there and steps. Two passes per step: AsyncSAM's accuracy semantics, not its speed.
- ``mode="sequential"`` with an :class:`~leantrain.optim.ascent_worker.Ascent`: the ascent of step t is computed
  in-process at w_t on its own batch of b' rows (the paper's separate, smaller ascent batch), then the closure
  runs once at w_t + ε_t. The deterministic reference for the two-process mode.
- ``mode="two_process"`` (the paper's system): a second process on its own core computes the ascent at w_t while
  this process takes its descent step at w_t + ε_t (:class:`~leantrain.optim.ascent_worker.AscentWorker`);
  b' follows the system-aware rule with ``batch_size="auto"``. ``on_miss="wait"`` blocks until the ascent of
  the previous step is there (staleness exactly 1; same trajectory as the sequential mode with the same
  ``Ascent``); ``on_miss="reuse"`` never waits and perturbs with the newest ascent available (staleness ≥ 1,
  counted in :attr:`AsyncSAM.async_stats`). ``slowdown=s`` emulates an s-times slower ascent device with real
  compute. The first step, and the first step after ``load_state_dict``, is a plain base-optimizer step. With the
  parameters on a GPU the worker still runs on the CPU, the paper's setting (see
  :mod:`~leantrain.optim.ascent_worker`); it is then started with ``spawn``.

:func:`resolve_mode` turns ``"auto"`` (recipes: ``optim.mode: auto``) into ``"two_process"`` when this process may
run on at least two CPU cores (and the staleness is 1), else ``"sequential"``.

Deliberate departures and choices:

- ε is ρ·v/(‖T_w g‖ + 1e-12) with ρ read from the param group when ε is *applied*, so ρ schedules act at once.
  ASAM (``adaptive=True``) uses SAM's operator T_w (``adaptive_form``, ``adaptive_eta``; :meth:`SAM.asam_etas`), in
  process and on the worker alike; the worker gets the per-parameter η when it starts.
- ``"auto"`` counts the cores in this process's affinity mask (``os.sched_getaffinity``), not ``os.cpu_count()``,
  where the platform has one: a container or ``taskset`` limited to one core gets the sequential mode.
- In the sequential mode the queued ascents are part of ``state_dict()``, so a resumed run is identical to an
  uninterrupted one (the spec allows restarting with ε = 0; keeping them is exact). The two-process mode restarts
  with one unperturbed step, as the spec says; its transient state is not saved.
- In the modes with an ``Ascent`` the closure only ever runs at the perturbed weights, so the returned loss (and
  the BatchNorm running statistics it updates) are the perturbed pass's, as in the paper's system. Without one,
  ``step(closure)`` with ``model=`` freezes the statistics during the perturbed call, as ``SAM.step`` does, so
  staleness 0 stays SAM with BatchNorm too.
- Close the two-process optimizer with ``close()`` (or use it as a context manager); the worker is a daemon
  process, so it also ends with the training process.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from leantrain.errors import ConfigError, LeantrainError
from leantrain.optim.ascent_worker import Ascent, AscentWorker, ascent_vectors, synchronize
from leantrain.optim.sam import _EPS, SAM, bn_stats_frozen

_MODES = ("sequential", "two_process")
_ON_MISS = ("wait", "reuse")


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask where the platform has one, else ``os.cpu_count()``."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_mode(mode: str, staleness: int = 1) -> str:
    """``mode`` itself, or for ``"auto"``: ``"two_process"`` when at least two cores are available and the staleness
    is 1 (the only one the two-process mode runs), else ``"sequential"``."""
    if mode != "auto":
        return mode
    return "two_process" if staleness == 1 and available_cores() >= 2 else "sequential"


class AsyncSAM(SAM):
    """SAM whose perturbation comes from the gradient ``staleness`` steps earlier (see the module docstring).

    ``model`` is needed with ``ascent`` (the ascent pass runs the model); ``worker_cpu`` pins the ascent process to
    a core (Linux), ``worker_threads`` is its torch thread count, ``worker_start`` its start method (default: fork on
    Linux with everything on the CPU, spawn with a GPU or elsewhere); ``adaptive_form`` / ``adaptive_eta`` choose
    ASAM's T_w as in :class:`SAM`; ``base_kwargs`` go to the base optimizer.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        staleness: int = 1,
        adaptive: bool = False,
        *,
        model: nn.Module | None = None,
        ascent: Ascent | None = None,
        mode: str = "sequential",
        on_miss: str = "wait",
        slowdown: int = 1,
        worker_cpu: int | None = None,
        worker_threads: int = 1,
        worker_start: str | None = None,
        adaptive_form: str = "official",
        adaptive_eta: float = 0.01,
        **base_kwargs: Any,
    ):
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise ConfigError(f"AsyncSAM staleness={staleness!r} is invalid; accepted: an integer >= 0 (paper: 1)")
        if mode not in _MODES:
            raise ConfigError(
                f"AsyncSAM mode={mode!r} is invalid; accepted values: {_MODES} (resolve 'auto' with resolve_mode)"
            )
        if on_miss not in _ON_MISS:
            raise ConfigError(f"AsyncSAM on_miss={on_miss!r} is invalid; accepted values: {_ON_MISS}")
        for name, value in (("slowdown", slowdown), ("worker_threads", worker_threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"AsyncSAM {name}={value!r} is invalid; expected an integer >= 1")
        if ascent is not None and not isinstance(ascent, Ascent):
            raise ConfigError(f"AsyncSAM ascent={ascent!r} is invalid; pass leantrain.optim.Ascent(loss_fn, data)")
        if ascent is not None and model is None:
            raise ConfigError("AsyncSAM with an ascent batch needs model=: the ascent pass runs the model")
        if mode == "two_process":
            if ascent is None:
                raise ConfigError("AsyncSAM mode='two_process' needs ascent=Ascent(loss_fn, data, batch_size=...)")
            if staleness != 1:
                raise ConfigError(f"AsyncSAM mode='two_process' runs with staleness 1 (got {staleness})")
        elif ascent is not None and ascent.batch_size == "auto":
            raise ConfigError("Ascent batch_size='auto' is the two-process rule; give an integer in sequential mode")
        super().__init__(params, base_optimizer=base_optimizer, rho=rho, adaptive=adaptive, model=model,
                         adaptive_form=adaptive_form, adaptive_eta=adaptive_eta, **base_kwargs)  # fmt: skip
        self.staleness, self.mode, self.on_miss = staleness, mode, on_miss
        self.ascent = ascent
        self._pending: list[tuple[list[torch.Tensor | None], torch.Tensor]] = []  # queued (vectors, norm)
        self._version = 0  # steps taken by this object: the version of the weights it publishes
        self._fresh = True  # the next two-process step has no ascent to use (first step, or after a resume)
        self.async_stats: dict[str, Any] = {
            "steps": 0, "misses": 0, "wait_s": 0.0, "staleness": Counter(), "ascent_batch_size": Counter(),
        }  # fmt: skip
        self._worker: AscentWorker | None = None
        self._plain_grads: list[torch.Tensor | None] | None = None  # first_step without an ε yet: the grad at w_t
        self._descent_started: float | None = None
        if mode == "two_process":
            self._worker = AscentWorker(model, self._params(), self.asam_etas(), ascent, slowdown=slowdown,
                                        cpu=worker_cpu, threads=worker_threads, start_method=worker_start)  # fmt: skip
            weakref.finalize(self, self._worker.close)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _ascent_vectors(self) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """(v, ‖T_w g‖) of the gradient now in ``.grad``, with SAM's ASAM operator (:meth:`SAM.asam_etas`)."""
        return ascent_vectors(self._params(), self.asam_etas())

    @torch.no_grad()
    def _perturb(self, vectors: list[torch.Tensor | None], norm: torch.Tensor) -> None:
        """w ← w + ρ·v/(‖T_w g‖ + 1e-12), saving w for the exact restore (the same arithmetic as SAM)."""
        flat = iter(vectors)
        for group in self.param_groups:
            scale = group["rho"] / (norm + _EPS)
            for p in group["params"]:
                v = next(flat)
                if v is not None:
                    self.state[p]["old_p"] = p.detach().clone()
                    p.add_(v * scale.to(p.device))
        self._perturbed = True

    def _ascent_in_process(self) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """The ascent of this step at w_t on its own batch, leaving grads, BN statistics and RNG untouched."""
        saved = [p.grad for p in self._params()]
        with torch.enable_grad(), bn_stats_frozen(self.model):
            self.ascent.gradient(self.model, self._version, self.ascent.batch_size)
            result = self._ascent_vectors()
        for p, g in zip(self._params(), saved, strict=True):
            p.grad = g
        return result

    def _take_and_publish(self) -> tuple[list[torch.Tensor | None], torch.Tensor] | None:
        """Two-process mode: the ascent to use now (None on a fresh start), then hand w_t to the worker."""
        worker, stats = self._worker, self.async_stats
        if worker.process is None:
            worker.start()
        ascent = None
        if not self._fresh:
            start = time.perf_counter()
            result = worker.take(self._version - 1, wait=self.on_miss == "wait")
            stats["wait_s"] += time.perf_counter() - start
            if result is None or result.version < self._version - 1:
                stats["misses"] += 1
            if result is not None:
                ascent = (result.vectors, result.norm)
                stats["staleness"][self._version - result.version] += 1
                stats["ascent_batch_size"][result.batch_size] += 1
        worker.publish(self._version)  # the worker computes the ascent at w_t while this process descends
        return ascent

    # ------------------------------------------------------------ the explicit (two-call) form

    @torch.no_grad()
    def perturb(self) -> None:
        """Modes with an ``Ascent``: move to w_t + ε_t before this step's forward pass; then backward, second_step.

        ε_t is the ascent computed at w_{t−τ}; while there is none yet (the first steps) the weights stay at w_t.
        """
        if self.ascent is None:
            raise LeantrainError(
                "AsyncSAM.perturb() is for the modes with an Ascent; without one the perturbation comes from the "
                "gradient at w: backward, first_step(), backward at the perturbed weights, second_step()"
            )
        if self._perturbed:
            raise LeantrainError("AsyncSAM.perturb() was called twice without second_step in between")
        if self.mode == "two_process":
            ascent = self._take_and_publish()
        else:
            self._pending.append(self._ascent_in_process())
            ascent = self._pending.pop(0) if len(self._pending) > self.staleness else None
        if ascent is not None:
            self._perturb(*ascent)
        self._perturbed = True
        self._descent_started = time.perf_counter()

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Sequential mode without an ``Ascent``: queue the gradient at w_t now in ``.grad`` as a later step's
        ascent and move to w_t + ε_{t−τ}; run the backward there, then ``second_step``.

        While the queue is filling, the weights stay at w_t and ``second_step`` steps with the gradient kept here.
        """
        if self.ascent is not None:
            raise LeantrainError("AsyncSAM with an Ascent: call perturb() before the forward pass, not first_step()")
        if grad_scaler is not None and grad_scaler.is_enabled():
            raise ConfigError(
                "AsyncSAM takes a grad_scaler only in the modes with an Ascent (one backward per step); "
                "use bf16 autocast here"
            )
        if self._perturbed:
            raise LeantrainError("AsyncSAM.first_step was called twice without second_step in between")
        self._pending.append(self._ascent_vectors())
        ascent = self._pending.pop(0) if len(self._pending) > self.staleness else None
        if ascent is None:
            self._plain_grads = [p.grad for p in self._params()]  # the gradient at w_t: second_step uses it
        else:
            self._perturb(*ascent)
        self._perturbed = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Restore w_t exactly and let the base optimizer step with the gradient in ``.grad``.

        With a ``grad_scaler`` (modes with an Ascent; the loss was ``grad_scaler.scale(loss).backward()``), the
        step goes through ``grad_scaler.step`` (skipped on inf/NaN, weights restored all the same) and
        ``grad_scaler.update()``.
        """
        if not self._perturbed:
            raise LeantrainError("AsyncSAM.second_step was called without perturb() or first_step()")
        scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        if scaler is not None and self.ascent is None:
            raise ConfigError("AsyncSAM takes a grad_scaler only in the modes with an Ascent")
        self._restore()
        if self._plain_grads is not None:
            for p, g in zip(self._params(), self._plain_grads, strict=True):
                p.grad = g
            self._plain_grads = None
        if scaler is None:
            self.base_optimizer.step()
        else:
            scaler.step(self.base_optimizer)
            scaler.update()
        if self._worker is not None and self._descent_started is not None:
            synchronize(self._params()[0].device)  # a GPU step is queued work; publishing waits for it anyway
            self._worker.report_descent(time.perf_counter() - self._descent_started)
            self.async_stats["steps"] += 1
        self._descent_started = None
        self._version += 1
        self._fresh = False
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One AsyncSAM step; ``closure`` zeroes grads, computes the loss, backward, returns the loss.

        Without a closure, ``step()`` after ``perturb()`` or ``first_step()`` is ``second_step()`` (trainers that
        own the backward pass, such as the Hugging Face ``Trainer`` with ``SharpnessAwareTrainer``).
        """
        if closure is None and self._perturbed:
            self.second_step()
            return None  # type: ignore[return-value]
        if closure is None:
            raise LeantrainError(
                "AsyncSAM.step needs a closure that zeroes grads, computes the loss, calls backward and returns it"
            )
        if self.ascent is None:
            with torch.enable_grad():
                loss = closure()  # the gradient at w_t: the ascent of step t + staleness
            self.first_step()
            if self._plain_grads is None:  # perturbed: the descent gradient at w_t + ε (statistics frozen, as SAM)
                self._closure_at_perturbed(closure, freeze_bn=self.model is not None)
            self.second_step()
            return loss
        self.perturb()
        loss = self._closure_at_perturbed(closure)
        self.second_step()
        return loss

    def _closure_at_perturbed(self, closure: Callable[[], torch.Tensor], freeze_bn: bool = False) -> torch.Tensor:
        try:
            with torch.enable_grad(), bn_stats_frozen(self.model) if freeze_bn else contextlib.nullcontext():
                return closure()
        except BaseException:
            self._restore()  # never leave the model at w + ε
            self._plain_grads = self._descent_started = None
            raise

    def close(self) -> None:
        """Stop the ascent process of the two-process mode (a no-op otherwise)."""
        if self._worker is not None:
            self._worker.close()

    def __enter__(self) -> AsyncSAM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["asyncsam_pending"] = [
            {"vectors": [None if v is None else v.clone() for v in vecs], "norm": norm.clone()}
            for vecs, norm in self._pending
        ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        pending = state_dict.pop("asyncsam_pending", [])
        super().load_state_dict(state_dict)
        params = self._params()
        self._pending = [
            (
                [None if v is None else v.to(p.device, p.dtype) for p, v in zip(params, e["vectors"], strict=True)],
                e["norm"].to(params[0].device),
            )
            for e in pending
        ]
        self._fresh = True
