"""AsyncSAM's ascent on a second process: the "slow device" that computes the next perturbation while the training
process (the "fast device") takes its descent step.

The training process publishes its weights w_t at the start of step t; the worker copies them into its own replica
of the model, computes the ascent gradient g' = ∇L_{B'_t}(w_t) on a fresh ascent batch B'_t of b' rows and
publishes it; the training process applies ε = ρ·g'/‖g'‖ at step t + 1 (staleness 1). Both processes run at the
same time on their own cores, so when b' is small enough the ascent is hidden behind the descent.

What is shared (``torch.multiprocessing``; the worker is forked on Linux, as DataLoader workers are, and spawned
elsewhere or with ``start_method="spawn"``, which needs the usual ``if __name__ == "__main__":`` guard in
scripts): one shared-memory tensor per optimized parameter for the weights, one per parameter for the published
ascent vector (g', or T_w²g' for ASAM), the ascent norm, the training data rows the ascent samples from, and a few
counters under one condition variable. Every copy in or out of the shared buffers happens under the condition's
lock, so neither side ever reads a half-written tensor.

System-aware ascent batch size (``batch_size="auto"``, the paper's rule): the largest b' whose ascent time fits
in the descent time, T_slow(b') ≤ T_fast(b). The worker profiles its own ascent time for each candidate b' at
start (stopping at the first candidate that does not fit), keeps a running estimate per candidate from every
ascent it runs, and before each ascent picks the largest candidate that fits the training process's current
descent time (an exponential average the training process publishes after every step).

Slow-device emulation (``slowdown=s``): the worker repeats each forward/backward s times and keeps the last
(identical) result, so an s-times slower device costs real CPU time on its core, not sleep.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leantrain.errors import ConfigError, LeantrainError

CANDIDATES = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_PROFILE_VERSION = 1 << 40  # ascent versions used only to time the candidates at start
_MARGIN = 0.9  # pick b' whose ascent fits in 90% of the descent time: the weight copy and jitter need the rest


@dataclass
class Ascent:
    """What AsyncSAM's ascent pass computes on, when it is not the descent batch of an earlier step.

    ``loss_fn(model, batch)`` returns the loss (or a tuple whose first item is the loss, as leantrain tasks do);
    for the two-process mode it must be picklable (a module-level function or a method of a module-level class).
    ``data`` holds the rows ascent batches are sampled from (a dict of tensors sharing their first dimension,
    the same keys the training batches have). The batch of ascent ``v`` is ``batch_size`` rows drawn without
    replacement by a generator seeded with ``(seed, v)``, and dropout inside the ascent forward is seeded the
    same way, so the ascent is reproducible and identical in both modes. ``batch_size`` is an integer, or
    ``"auto"`` (two-process mode only) for the system-aware rule, capped at ``max_batch_size``.
    """

    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], Any]
    data: dict[str, torch.Tensor]
    batch_size: int | str = "auto"
    max_batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not callable(self.loss_fn):
            raise ConfigError(f"Ascent loss_fn={self.loss_fn!r} is not callable; pass loss_fn(model, batch) -> loss")
        if not isinstance(self.data, dict) or not self.data:
            raise ConfigError("Ascent data must be a non-empty dict of tensors (the rows ascent batches come from)")
        sizes = {k: len(v) for k, v in self.data.items() if isinstance(v, torch.Tensor)}
        if len(sizes) != len(self.data) or len(set(sizes.values())) != 1:
            raise ConfigError(f"Ascent data must be tensors sharing their first dimension; got sizes {sizes}")
        self.num_rows = next(iter(sizes.values()))
        ok_max = isinstance(self.max_batch_size, int) and not isinstance(self.max_batch_size, bool)
        if not ok_max or self.max_batch_size < CANDIDATES[0]:
            raise ConfigError(f"Ascent max_batch_size={self.max_batch_size!r} is invalid; expected an int >= 8")
        if self.batch_size != "auto":
            ok = isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool)
            if not ok or not 1 <= self.batch_size <= self.num_rows:
                raise ConfigError(
                    f"Ascent batch_size={self.batch_size!r} is invalid; expected 'auto' or an int in "
                    f"[1, {self.num_rows}] (the number of data rows)"
                )

    def batch(self, version: int, batch_size: int) -> dict[str, torch.Tensor]:
        """The rows of ascent ``version`` (deterministic in (seed, version))."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + version)
        idx = torch.randperm(self.num_rows, generator=gen)[: min(batch_size, self.num_rows)]
        return {k: v[idx] for k, v in self.data.items()}

    def gradient(self, model: nn.Module, version: int, batch_size: int, repeats: int = 1) -> None:
        """Leave ∇L_{B'_version} of ``model`` in ``.grad`` (each of ``repeats`` passes recomputes it from scratch)."""
        batch = self.batch(version, batch_size)
        for _ in range(repeats):
            model.zero_grad(set_to_none=True)
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.manual_seed(self.seed * 1_000_003 + version)
                out = self.loss_fn(model, batch)
                loss = out[0] if isinstance(out, tuple | list) else out
                loss.backward()


def ascent_vectors(groups: list[tuple[list[torch.Tensor], bool]]) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """(v, ‖T_w g‖₂) from ``.grad``: v = T_w²g (ASAM, ``adaptive``) or g per parameter, None where no gradient.

    The perturbation is then ε = ρ·v/(‖T_w g‖ + 1e-12), computed exactly as :class:`~leantrain.optim.SAM` does.
    """
    device = groups[0][0][0].device
    vecs: list[torch.Tensor | None] = []
    norms = []
    with torch.no_grad():
        for params, adaptive in groups:
            for p in params:
                if p.grad is None:
                    vecs.append(None)
                    continue
                norms.append(((p.abs() * p.grad) if adaptive else p.grad).norm(p=2).to(device))
                vecs.append(p * p * p.grad if adaptive else p.grad.detach().clone())
    norm = torch.linalg.vector_norm(torch.stack(norms), ord=2) if norms else torch.zeros((), device=device)
    return vecs, norm


class BatchSizeRule:
    """The system-aware ascent batch size: the largest candidate b' whose ascent time fits in the descent time."""

    def __init__(self, max_batch_size: int, candidates: tuple[int, ...] = CANDIDATES):
        self.candidates = tuple(c for c in candidates if c <= max_batch_size) or (candidates[0],)
        self.times: dict[int, float] = {}  # measured ascent seconds per candidate (running average)

    def observe(self, batch_size: int, seconds: float) -> None:
        old = self.times.get(batch_size)
        self.times[batch_size] = seconds if old is None else 0.7 * old + 0.3 * seconds

    def estimate(self, batch_size: int) -> float | None:
        """Measured time, or a linear extrapolation up from the largest measured smaller candidate."""
        if batch_size in self.times:
            return self.times[batch_size]
        below = [c for c in self.times if c < batch_size]
        return self.times[max(below)] * batch_size / max(below) if below else None

    def choose(self, descent_s: float) -> int:
        budget = _MARGIN * descent_s
        best = self.candidates[0]
        for c in self.candidates:
            est = self.estimate(c)
            if est is not None and est <= budget:
                best = c
        return best

    def needs_profile(self, descent_s: float) -> int | None:
        """The next candidate to time at start: the smallest unmeasured one below the first that did not fit."""
        for c in self.candidates:
            est = self.times.get(c)
            if est is None:
                return c
            if est > _MARGIN * descent_s:
                return None
        return None


class _Shared:
    """The buffers and counters both processes see (picklable to a spawned process)."""

    def __init__(self, ctx, params: list[torch.Tensor], data: dict[str, torch.Tensor]):
        self.weights = [p.detach().clone().share_memory_() for p in params]
        self.vectors = [torch.zeros_like(p).share_memory_() for p in params]
        self.has_grad = torch.zeros(len(params), dtype=torch.bool).share_memory_()
        self.norm = torch.zeros((), dtype=torch.float64).share_memory_()
        self.data = {k: v.detach().contiguous().share_memory_() for k, v in data.items()}
        self.cond = ctx.Condition()
        self.weights_version = ctx.Value("q", -1, lock=False)  # the version of the weights in ``weights``
        self.ascent_version = ctx.Value("q", -1, lock=False)  # the weights version the published vector is from
        self.ascent_batch = ctx.Value("q", 0, lock=False)  # b' of the published vector
        self.ascent_s = ctx.Value("d", 0.0, lock=False)  # seconds the published ascent took (copy in to publish)
        self.descent_s = ctx.Value("d", 0.0, lock=False)  # the training process's descent time (running average)
        self.stop = ctx.Value("b", False, lock=False)
        self.error = ctx.Array("c", 8192, lock=False)  # the worker's traceback, if it failed


def _worker_main(replica, index: list[int], adaptive: list[bool], shared: _Shared, ascent: Ascent,
                 slowdown: int, cpu: int | None, threads: int) -> None:  # fmt: skip
    try:
        if cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {cpu})
        torch.set_num_threads(threads)
        torch.set_grad_enabled(True)  # a forked worker inherits the grad mode of the moment it was started
        all_params = list(replica.parameters())
        params = [all_params[i] for i in index]
        groups = [([p], a) for p, a in zip(params, adaptive, strict=True)]
        replica.train()
        rule = BatchSizeRule(ascent.max_batch_size) if ascent.batch_size == "auto" else None
        done = -1
        while True:
            with shared.cond:
                shared.cond.wait_for(lambda d=done: shared.stop.value or shared.weights_version.value > d)
                if shared.stop.value:
                    return
            if rule is not None:  # profile the candidates that may fit, on the current weights, once
                with shared.cond:
                    shared.cond.wait_for(lambda: shared.stop.value or shared.descent_s.value > 0)
                while (c := rule.needs_profile(shared.descent_s.value)) is not None and not shared.stop.value:
                    start = time.perf_counter()
                    ascent.gradient(replica, _PROFILE_VERSION + c, c, repeats=slowdown)
                    rule.observe(c, time.perf_counter() - start)
            start = time.perf_counter()
            with shared.cond:
                version = shared.weights_version.value
                with torch.no_grad():
                    for p, w in zip(params, shared.weights, strict=True):
                        p.copy_(w)
            size = ascent.batch_size if rule is None else rule.choose(shared.descent_s.value)
            ascent.gradient(replica, version, size, repeats=slowdown)
            vecs, norm = ascent_vectors(groups)
            with shared.cond:
                with torch.no_grad():
                    for i, (v, out) in enumerate(zip(vecs, shared.vectors, strict=True)):
                        shared.has_grad[i] = v is not None
                        if v is not None:
                            out.copy_(v)
                    shared.norm.copy_(norm)
                shared.ascent_version.value = version
                shared.ascent_batch.value = size
                shared.ascent_s.value = time.perf_counter() - start
                shared.cond.notify_all()
            if rule is not None:
                rule.observe(size, time.perf_counter() - start)
            done = version
    except BaseException:  # noqa: BLE001 -- reported to the training process, which raises it
        text = traceback.format_exc()[-8000:].encode("utf-8", "replace")
        with shared.cond:
            shared.error[: len(text)] = text
            shared.cond.notify_all()


class AscentProcessError(RuntimeError):
    """The ascent process raised: one line (its last) as the message, the whole traceback in ``details``."""

    def __init__(self, traceback_text: str):
        last = traceback_text.strip().splitlines()[-1] if traceback_text.strip() else "no traceback"
        super().__init__(f"AsyncSAM's ascent process failed: {last}")
        self.details = traceback_text


@dataclass
class AscentResult:
    """One published ascent: the vectors (None where no gradient), their norm, and what it was computed on."""

    vectors: list[torch.Tensor | None]
    norm: torch.Tensor
    version: int
    batch_size: int
    seconds: float


class AscentWorker:
    """The training process's handle on the ascent process (start, publish weights, take the ascent, close)."""

    def __init__(self, model: nn.Module, params: list[torch.Tensor], adaptive: list[bool], ascent: Ascent,
                 slowdown: int = 1, cpu: int | None = None, threads: int = 1, timeout_s: float = 600.0,
                 start_method: str | None = None):  # fmt: skip
        positions = {id(p): i for i, p in enumerate(model.parameters())}
        missing = [i for i, p in enumerate(params) if id(p) not in positions]
        if missing:
            raise ConfigError(
                f"AsyncSAM two-process mode: optimized parameters {missing} are not parameters of the given model; "
                "pass the model whose parameters are optimized"
            )
        self.index = [positions[id(p)] for p in params]
        self.model, self.adaptive, self.ascent = model, adaptive, ascent
        self.slowdown, self.cpu, self.threads, self.timeout_s = slowdown, cpu, threads, timeout_s
        self.params = params
        if start_method not in (None, "fork", "spawn", "forkserver"):
            raise ConfigError(
                f"start_method={start_method!r} is invalid; accepted: None, 'fork', 'spawn', 'forkserver'"
            )
        self.start_method = start_method or ("fork" if sys.platform.startswith("linux") else "spawn")
        self.process = None
        self.shared: _Shared | None = None

    def start(self) -> None:
        import copy

        import torch.multiprocessing as mp

        ctx = mp.get_context(self.start_method)
        self.shared = _Shared(ctx, self.params, self.ascent.data)
        replica = copy.deepcopy(self.model).cpu()
        ascent = Ascent(self.ascent.loss_fn, self.shared.data, self.ascent.batch_size, self.ascent.max_batch_size,
                        self.ascent.seed)  # fmt: skip
        process = ctx.Process(
            target=_worker_main,
            args=(replica, self.index, self.adaptive, self.shared, ascent, self.slowdown, self.cpu, self.threads),
            daemon=True,
            name="leantrain-asyncsam-ascent",
        )
        process.start()
        self.process = process

    def _check(self) -> None:
        shared = self.shared
        if shared is not None and shared.error[0] != b"\x00":
            message = bytes(shared.error[:]).split(b"\x00", 1)[0].decode("utf-8", "replace")
            self.close()
            raise AscentProcessError(message)
        if self.process is not None and not self.process.is_alive():
            code = self.process.exitcode
            self.close()
            raise LeantrainError(f"AsyncSAM's ascent process exited unexpectedly (exit code {code})")

    def publish(self, version: int) -> None:
        """Copy the current weights into the shared buffers as ``version`` and wake the worker."""
        shared = self.shared
        with shared.cond, torch.no_grad():
            for w, p in zip(shared.weights, self.params, strict=True):
                w.copy_(p.detach())
            shared.weights_version.value = version
            shared.cond.notify_all()

    def report_descent(self, seconds: float) -> None:
        """Fold one descent's duration into the running average the batch-size rule reads; wake the worker."""
        shared = self.shared
        with shared.cond:
            old = shared.descent_s.value
            shared.descent_s.value = seconds if old <= 0 else 0.8 * old + 0.2 * seconds
            shared.cond.notify_all()

    def take(self, version: int, wait: bool) -> AscentResult | None:
        """The newest ascent; with ``wait``, block until the one computed on weights ``version`` is published."""
        shared = self.shared
        deadline = time.monotonic() + self.timeout_s
        with shared.cond:
            while wait and shared.ascent_version.value < version:
                self._check()
                if time.monotonic() > deadline:
                    raise LeantrainError(
                        f"AsyncSAM waited {self.timeout_s:.0f} s for the ascent on the weights of step {version}; "
                        "gave up"
                    )
                shared.cond.wait(timeout=1.0)
            self._check()
            if shared.ascent_version.value < 0:
                return None
            with torch.no_grad():
                vecs = [
                    v.to(p.device, copy=True) if shared.has_grad[i] else None
                    for i, (v, p) in enumerate(zip(shared.vectors, self.params, strict=True))
                ]
                norm = shared.norm.to(self.params[0].device, self.params[0].dtype, copy=True)
            return AscentResult(vecs, norm, shared.ascent_version.value, shared.ascent_batch.value,
                                shared.ascent_s.value)  # fmt: skip

    def close(self) -> None:
        """Stop the worker process (politely, then by force) and drop the shared buffers."""
        process, shared = self.process, self.shared
        self.process = None
        if process is None:
            return
        if shared is not None:
            with shared.cond:
                shared.stop.value = True
                shared.cond.notify_all()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join(timeout=10)
