"""AsyncSAM's ascent on a second process: the "slow device" that computes the next perturbation while the training
process (the "fast device") takes its descent step.

The training process publishes its weights w_t at the start of step t; the worker copies them into its own replica
of the model, computes the ascent gradient g' = ∇L_{B'_t}(w_t) on a fresh ascent batch B'_t of b' rows and
publishes it; the training process applies ε = ρ·g'/‖g'‖ at step t + 1 (staleness 1). Both processes run at the
same time on their own cores, so when b' is small enough the ascent is hidden behind the descent.

What is shared (``torch.multiprocessing``): one CPU shared-memory tensor per optimized parameter for the weights,
one per parameter for the published ascent vector (g', or T_w²g' for ASAM), the ascent norm, and a few counters
under one condition variable. Every copy in or out of the shared buffers happens under the condition's lock, so
neither side ever reads a half-written tensor. The ascent data reach the worker with its other arguments when it
starts, never through a buffer: a dict of row tensors, or an iterable of batches (a ``DataLoader``) it iterates
itself, so a dataset that loads lazily is never copied whole.

Where the training runs on a GPU (the paper's setting: descent on the GPU, ascent on the host CPU), the buffers
still live in host memory: the training process copies its weights device → host when it publishes them and the
ascent vectors host → device when it takes them, and the worker, a CPU replica built without a second copy on
the GPU, never touches the device. Such a worker is started with ``spawn``: CUDA does not survive ``fork``.

System-aware ascent batch size (``batch_size="auto"``, the paper's rule): the largest b' whose ascent time fits
in the descent time, T_slow(b') ≤ T_fast(b). The worker profiles its own ascent time for each candidate b' at
start (stopping at the first candidate that does not fit), keeps a running estimate per candidate from every
ascent it runs, and before each ascent picks the largest candidate that fits the training process's current
descent time (an exponential average the training process publishes after every step).

Slow-device emulation (``slowdown=s``): the worker repeats each forward/backward s times and keeps the last
(identical) result, so an s-times slower device costs real CPU time on its core, not sleep.

Deliberate departures and choices:

- Start method: ``fork`` on Linux when everything is on the CPU and CUDA is not initialized in the training process
  (cheap, as DataLoader workers are); ``spawn`` when a parameter lives on another device or CUDA is initialized,
  and on other platforms. ``spawn`` pickles what the worker gets (the replica, the ``Ascent`` with its
  ``loss_fn`` and data, the shared buffers), so those must be picklable, and scripts need the usual
  ``if __name__ == "__main__":`` guard. The worker unpickles only what its parent sends it.
- The worker is a daemon process, so it ends with training; a daemon cannot start processes of its own, so an
  ascent ``DataLoader`` must have ``num_workers=0`` in the two-process mode.
- Host ↔ device copies are plain synchronous copies (no pinned staging buffer): the weights' copy must wait for
  the step that produced them anyway.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leantrain.errors import ConfigError, LeantrainError
from leantrain.optim.sam import ascent_direction

CANDIDATES = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_PROFILE_VERSION = 1 << 40  # ascent versions used only to time the candidates at start
_MARGIN = 0.9  # pick b' whose ascent fits in 90% of the descent time: the weight copy and jitter need the rest
_STREAM_SALT = 1 << 42  # seeds the iteration of an ascent iterable apart from the dropout of the same version
START_METHODS = (None, "fork", "spawn", "forkserver")


@dataclass
class Ascent:
    """What AsyncSAM's ascent pass computes on, when it is not the descent batch of an earlier step.

    ``loss_fn(model, batch)`` returns the loss (or a tuple whose first item is the loss, as leantrain tasks do); for
    a spawned worker it must be picklable (a module-level function or a method of a module-level class).

    ``data`` is either

    - a dict of tensors sharing their first dimension (the training rows): the batch of ascent ``v`` is
      ``batch_size`` rows drawn without replacement by a generator seeded with ``(seed, v)``; or
    - an iterable of batches (a ``DataLoader``, a list; re-iterable, not a one-shot iterator): each ascent pass takes
      the next batch, cut to its first ``batch_size`` rows (``None``: the whole batch), and a new pass over the
      data starts when one ends. ``iter`` and ``next`` run under torch's RNG seeded from ``(seed, v)``, so a
      shuffling ``DataLoader`` without its own generator yields the same batches in both modes.

    Dropout inside the ascent forward is seeded with ``(seed, v)`` too, so the ascent is reproducible and identical
    in the sequential and two-process modes. ``batch_size`` is an integer, or ``"auto"`` (two-process mode only)
    for the system-aware rule, capped at ``max_batch_size``. Batches are moved to the model's device.
    """

    loss_fn: Callable[[nn.Module, Any], Any]
    data: dict[str, torch.Tensor] | Iterable[Any]
    batch_size: int | str | None = "auto"
    max_batch_size: int = 256
    seed: int = 0
    _stream: Iterator[Any] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not callable(self.loss_fn):
            raise ConfigError(f"Ascent loss_fn={self.loss_fn!r} is not callable; pass loss_fn(model, batch) -> loss")
        if not _positive_int(self.max_batch_size) or self.max_batch_size < CANDIDATES[0]:
            raise ConfigError(f"Ascent max_batch_size={self.max_batch_size!r} is invalid; expected an int >= 8")
        if isinstance(self.data, dict):
            return self._check_rows()
        if isinstance(self.data, torch.Tensor | Iterator) or not isinstance(self.data, Iterable):
            raise ConfigError(
                f"Ascent data={type(self.data).__name__} is invalid; pass a dict of tensors (the rows ascent batches "
                "are drawn from) or a re-iterable of batches such as a DataLoader or a list (not a one-shot iterator)"
            )
        self.num_rows = None
        if self.batch_size not in ("auto", None) and not _positive_int(self.batch_size):
            raise ConfigError(
                f"Ascent batch_size={self.batch_size!r} is invalid; expected 'auto', None (whole batches), an int >= 1"
            )

    def _check_rows(self) -> None:
        sizes = {k: len(v) for k, v in self.data.items() if isinstance(v, torch.Tensor)}
        if not sizes or len(sizes) != len(self.data) or len(set(sizes.values())) != 1:
            raise ConfigError(f"Ascent data must be tensors sharing their first dimension; got sizes {sizes}")
        self.num_rows = next(iter(sizes.values()))
        if self.batch_size != "auto" and not (_positive_int(self.batch_size) and self.batch_size <= self.num_rows):
            raise ConfigError(
                f"Ascent batch_size={self.batch_size!r} is invalid; expected 'auto' or an int in "
                f"[1, {self.num_rows}] (the number of data rows)"
            )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stream": None}  # a live iterator does not cross to a spawned worker

    def on_host(self) -> Ascent:
        """This ascent with its row tensors on the CPU (a copy only of rows that live elsewhere), for the worker."""
        if self.num_rows is None or all(v.device.type == "cpu" for v in self.data.values()):
            return self
        return dataclasses.replace(self, data={k: v.detach().cpu() for k, v in self.data.items()})

    def batch(self, version: int, batch_size: int | None) -> Any:
        """The batch of ascent ``version`` (rows: deterministic in (seed, version); an iterable: its next batch)."""
        if self.num_rows is not None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + version)
            idx = torch.randperm(self.num_rows, generator=gen)[: min(batch_size or self.num_rows, self.num_rows)]
            return {k: v[idx] for k, v in self.data.items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + version + _STREAM_SALT)
            rows = None
            for _ in range(2):  # the current pass, then one new pass when it has ended
                if self._stream is None:
                    self._stream = iter(self.data)
                rows = next(self._stream, None)
                if rows is not None:
                    break
                self._stream = None
        if rows is None:
            raise LeantrainError("Ascent data yielded no batch; give it a non-empty, re-iterable DataLoader or list")
        return rows if batch_size is None else _map_tensors(rows, lambda t: t[:batch_size] if t.dim() else t)

    def gradient(self, model: nn.Module, version: int, batch_size: int | None, repeats: int = 1) -> int:
        """Leave ∇L_{B'_version} of ``model`` in ``.grad`` (each of ``repeats`` passes recomputes it from scratch);
        return the batch's rows (the first dimension of its first tensor)."""
        device, rows = next(model.parameters()).device, []

        def to_device(t: torch.Tensor) -> torch.Tensor:
            rows.append(len(t) if t.dim() else 0)
            return t.to(device)

        batch = _map_tensors(self.batch(version, batch_size), to_device)
        for _ in range(repeats):
            model.zero_grad(set_to_none=True)
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.manual_seed(self.seed * 1_000_003 + version)
                out = self.loss_fn(model, batch)
                loss = out[0] if isinstance(out, tuple | list) else out
                loss.backward()
        return rows[0] if rows else 0


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it (a tensor, or a dict, tuple or list of them)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def ascent_vectors(
    params: list[torch.Tensor], etas: list[float | None]
) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """(v, ‖T_w g‖₂) from ``.grad`` as :func:`~leantrain.optim.sam.ascent_direction` computes them (v = T_w²g, with
    ``etas`` from :meth:`~leantrain.optim.SAM.asam_etas`), each v a tensor of its own: it is queued or published
    while ``.grad`` is reused. ε = ρ·v/(‖T_w g‖ + 1e-12), exactly as :class:`~leantrain.optim.SAM` perturbs.
    """
    vecs, norm = ascent_direction(params, etas)
    own = [v.detach().clone() if v is not None and v is p.grad else v for v, p in zip(vecs, params, strict=True)]
    return own, norm


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


def host_buffers(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zeroed CPU shared-memory tensors shaped and typed like ``params``, wherever those live.

    The exchange buffers are host memory whatever the training device: a CUDA tensor cannot cross a ``fork`` and
    would need CUDA IPC (and the device) in the worker after a ``spawn``.
    """
    return [torch.zeros(p.shape, dtype=p.dtype, device="cpu").share_memory_() for p in params]


def host_replica(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the CPU for the ascent, made without a second copy on the model's own device.

    Every parameter and buffer is copied to the host first and handed to ``deepcopy`` through its memo, so a model
    on a GPU is never duplicated there. The replica's parameters keep their ``requires_grad`` and have no ``.grad``.
    """
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        host = t.detach().to("cpu", copy=True)
        memo[id(t)] = nn.Parameter(host, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else host
    return copy.deepcopy(model, memo).cpu()


def device_in_use(params: list[torch.Tensor]) -> str | None:
    """The first non-CPU device type among ``params`` ('cuda', 'meta', ...), else 'cuda' when CUDA is initialized in
    this process (a CPU model beside a GPU one), else None: whether ``fork`` is unsafe."""
    types = sorted({p.device.type for p in params} - {"cpu"})
    if types:
        return types[0]
    return "cuda" if torch.cuda.is_initialized() else None


def worker_start_method(requested: str | None, params: list[torch.Tensor]) -> str:
    """The start method of the ascent process: ``requested``, or fork on Linux when no device is in use, else spawn."""
    if requested not in START_METHODS:
        raise ConfigError(f"AsyncSAM worker_start={requested!r} is invalid; accepted: {START_METHODS}")
    device = device_in_use(params)
    if requested == "fork" and device is not None:
        raise ConfigError(
            f"AsyncSAM worker_start='fork' cannot be used while {device} is in use in the training process (a "
            "forked child cannot use CUDA, and a GPU model cannot be copied there); use 'spawn' or leave it None"
        )
    if requested is not None:
        return requested
    return "fork" if device is None and sys.platform.startswith("linux") else "spawn"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU), so a wall-clock time covers the device's work."""
    if device.type not in ("cpu", "meta"):
        torch.accelerator.synchronize(device)


class _Shared:
    """The buffers and counters both processes see (picklable to a spawned process); the tensors are host memory."""

    def __init__(self, ctx, params: list[torch.Tensor]):
        self.weights = host_buffers(params)
        self.vectors = host_buffers(params)
        self.has_grad = torch.zeros(len(params), dtype=torch.bool).share_memory_()
        self.norm = torch.zeros((), dtype=torch.float64).share_memory_()
        self.cond = ctx.Condition()
        self.weights_version = ctx.Value("q", -1, lock=False)  # the version of the weights in ``weights``
        self.ascent_version = ctx.Value("q", -1, lock=False)  # the weights version the published vector is from
        self.ascent_batch = ctx.Value("q", 0, lock=False)  # b' of the published vector
        self.ascent_s = ctx.Value("d", 0.0, lock=False)  # seconds the published ascent took (copy in to publish)
        self.descent_s = ctx.Value("d", 0.0, lock=False)  # the training process's descent time (running average)
        self.stop = ctx.Value("b", False, lock=False)
        self.error = ctx.Array("c", 8192, lock=False)  # the worker's traceback, if it failed


def _worker_main(replica: nn.Module, index: list[int], etas: list[float | None], shared: _Shared, ascent: Ascent,
                 slowdown: int, cpu: int | None, threads: int) -> None:  # fmt: skip
    """The ascent process (module level, so a spawned process can import it); reports a failure via ``shared``."""
    try:
        if cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {cpu})
        torch.set_num_threads(threads)
        torch.set_grad_enabled(True)  # a forked worker inherits the grad mode of the moment it was started
        all_params = list(replica.parameters())
        params = [all_params[i] for i in index]
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
            rows = ascent.gradient(replica, version, size, repeats=slowdown)
            vecs, norm = ascent_vectors(params, etas)
            with shared.cond:
                with torch.no_grad():
                    for i, (v, out) in enumerate(zip(vecs, shared.vectors, strict=True)):
                        shared.has_grad[i] = v is not None
                        if v is not None:
                            out.copy_(v)
                    shared.norm.copy_(norm)
                shared.ascent_version.value = version
                shared.ascent_batch.value = rows
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
    """One published ascent: the vectors (None where no gradient), their norm, its weights version and b' rows."""

    vectors: list[torch.Tensor | None]
    norm: torch.Tensor
    version: int
    batch_size: int
    seconds: float


class AscentWorker:
    """The training process's handle on the ascent process (start, publish weights, take the ascent, close).

    ``etas`` are the per-parameter ASAM operators of :meth:`~leantrain.optim.SAM.asam_etas` (all None for SAM).
    """

    def __init__(self, model: nn.Module, params: list[torch.Tensor], etas: list[float | None], ascent: Ascent,
                 slowdown: int = 1, cpu: int | None = None, threads: int = 1, timeout_s: float = 600.0,
                 start_method: str | None = None):  # fmt: skip
        positions = {id(p): i for i, p in enumerate(model.parameters())}
        missing = [i for i, p in enumerate(params) if id(p) not in positions]
        if missing:
            raise ConfigError(
                f"AsyncSAM two-process mode: optimized parameters {missing} are not parameters of the given model; "
                "pass the model whose parameters are optimized"
            )
        if getattr(ascent.data, "num_workers", 0):
            raise ConfigError(
                f"AsyncSAM two-process mode: the ascent DataLoader has num_workers={ascent.data.num_workers}; the "
                "ascent process cannot start loader processes of its own, give it a DataLoader with num_workers=0"
            )
        worker_start_method(start_method, params)  # a bad or unsafe choice fails here, not at the first step
        self.index = [positions[id(p)] for p in params]
        self.model, self.etas, self.ascent = model, list(etas), ascent
        self.slowdown, self.cpu, self.threads, self.timeout_s = slowdown, cpu, threads, timeout_s
        self.params = params
        self.requested_start = start_method
        self.start_method: str | None = None  # resolved at start (CUDA may be initialized by then)
        self.process = None
        self.shared: _Shared | None = None

    def start(self) -> None:
        import torch.multiprocessing as mp

        self.start_method = worker_start_method(self.requested_start, self.params)
        ctx = mp.get_context(self.start_method)
        self.shared = _Shared(ctx, self.params)
        args = (host_replica(self.model), self.index, self.etas, self.shared, self.ascent.on_host(), self.slowdown,
                self.cpu, self.threads)  # fmt: skip
        process = ctx.Process(target=_worker_main, args=args, daemon=True, name="leantrain-asyncsam-ascent")
        try:
            process.start()  # spawn: pickles the arguments here, before any process exists
        except (AttributeError, TypeError, pickle.PicklingError) as err:
            raise ConfigError(
                f"AsyncSAM's ascent process starts with {self.start_method!r}, which pickles the model, the Ascent "
                f"(loss_fn, data) and the buffers, and one of them cannot be: {err}. Use a module-level loss_fn "
                "and model class"
            ) from err
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
        """Copy the current weights (device → host) into the shared buffers as ``version`` and wake the worker."""
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
        """The newest ascent (host → the parameters' device); with ``wait``, block until the one computed on weights
        ``version`` is published."""
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
