"""Process groups on one machine or many (torch.distributed): launch, join, agree to stop, report a dead process.

Shared by every area that runs several processes: the federated simulator's worker processes
(:mod:`leantrain.federated.engines.workers`) and local SGD across devices of different speed (:mod:`leantrain.hetero`).

- :func:`launch` spawns ranks 1..N-1 on this machine and makes the calling process rank 0 for a ``with`` block. A
  rank that dies (an exception, a signal, ``os._exit``) is reported as one :class:`LeantrainError` naming it, never a
  hang: rank 0's collectives fail when a peer's connection closes, and every collective has a timeout
  (``timeout_s``). On leaving the block the group is destroyed and every spawned process is joined, or terminated
  if it outlives rank 0 (:func:`spawned_pids` names them, so a caller can check none is left).
- :func:`init_from_env` joins a group ``torchrun`` started (several machines: ``torchrun --nnodes ...``).
- :func:`agreed` turns one rank's stop request (Ctrl-C) into a decision of all ranks; spawned ranks ignore SIGINT.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from leantrain.errors import ConfigError, LeantrainError


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agreed(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a Ctrl-C seen by one rank stops all after the round)."""
    rank, size = world()
    if size == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def set_worker_threads(threads: int | None) -> None:
    """One torch thread per worker process unless the user chose a count (workers share the machine's cores)."""
    torch.set_num_threads(threads or 1)


def init_from_env(backend: str = "gloo", timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group ``torchrun`` set up (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); (rank, size).
    ``timeout_s``: how long a collective may wait for a peer before it fails (None: torch's default)."""
    if not dist.is_initialized():
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        dist.init_process_group(backend, timeout=timeout)
    return world()


def torchrun_world() -> tuple[int, int] | None:
    """(rank, world size) from a launcher's environment (``torchrun``) when it started several processes."""
    size = os.environ.get("WORLD_SIZE")
    if size is None or "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    try:
        return (int(os.environ["RANK"]), int(size)) if int(size) > 1 else None
    except ValueError:
        raise ConfigError(f"RANK={os.environ['RANK']!r} / WORLD_SIZE={size!r} are not integers") from None


def _spawned(index: int, fn: Callable, host: str, port: int, size: int, threads: int | None, args: tuple,
             backend: str = "gloo", timeout_s: float = 1800.0) -> None:  # fmt: skip
    """Entry point of a spawned rank (``index + 1``): one thread, no Ctrl-C of its own, join the group, run."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when to stop (see agreed); it ends us if need be
    set_worker_threads(threads)
    rank = index + 1
    store = dist.TCPStore(host, port, size, is_master=False, timeout=timedelta(seconds=300))
    store.set(f"joined/{rank}", "1")
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, size, *args)
    finally:
        dist.destroy_process_group()
    # The work is done and the group is gone: leave without C++ static destructors. A store or gloo thread still
    # joinable at interpreter exit can abort a finished rank ("terminate called without an active exception",
    # SIGABRT), which rank 0 would report as a failure (seen once in a CI run of the hetero real-process test).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _child_error(exc: BaseException) -> str:
    """One line of a spawned rank's failure (the last line of its traceback, or its exit code)."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    if isinstance(exc, ProcessRaisedException):
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        return lines[-1].strip() if lines else "raised an exception"
    if isinstance(exc, ProcessExitedException):
        how = f"was killed by signal {exc.signal_name}" if exc.signal_name else f"exited with code {exc.exit_code}"
        return how
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def launch(fn: Callable, size: int, args: tuple = (), threads: int | None = None, timeout_s: float = 1800.0,
           label: str = "worker", backend: str = "gloo") -> Iterator[int]:  # fmt: skip
    """Spawn ranks 1..size-1 on this machine running ``fn(rank, size, *args)`` (a module-level function) and make
    this process rank 0 of a ``backend`` group for the ``with`` block (yields the size).

    A failure of any rank is raised here as one :class:`LeantrainError` naming the worker ("<label> <rank> failed:
    ..."); a collective that waits longer than ``timeout_s`` for a peer fails. On leaving the block (normally or
    not) the group is destroyed and the workers are joined (ended if they outlive rank 0).
    """
    import torch.multiprocessing as mp

    if dist.is_initialized():
        raise ConfigError(f"{label}s: a torch.distributed process group is already running in this process")
    previous_threads = torch.get_num_threads()
    set_worker_threads(threads)
    host = "127.0.0.1"
    store = dist.TCPStore(host, 0, size, is_master=True, timeout=timedelta(seconds=300), wait_for_workers=False)
    context = mp.start_processes(_spawned, args=(fn, host, store.port, size, threads, args, backend, timeout_s),
                                 nprocs=size - 1, join=False, start_method="spawn")  # fmt: skip
    _SPAWNED[:] = [p.pid for p in context.processes]
    try:
        try:
            _wait_for(context, store, size, label)
            timeout = timedelta(seconds=timeout_s)
            dist.init_process_group(backend, store=store, rank=0, world_size=size, timeout=timeout)
            yield size
        except BaseException as err:
            if dist.is_initialized():
                dist.destroy_process_group()  # workers waiting on rank 0 get an error now, not after the timeout
            why = _join(context, 10.0)
            if _communication_error(err):
                if why is not None:
                    raise LeantrainError(f"{label} {why}") from None
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise LeantrainError(f"a {label} stopped answering (collectives time out after {timeout_s:g} s): "
                                     f"{first}") from None  # fmt: skip
            raise
        dist.destroy_process_group()
        why = _join(context, 120.0)
        if why is not None:
            raise LeantrainError(f"{label} {why}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for p in context.processes:
            if p.is_alive():
                p.terminate()
        for p in context.processes:
            p.join(5)
        torch.set_num_threads(previous_threads)


def spawned_pids() -> list[int]:
    """The process ids of the ranks the latest :func:`launch` spawned (to check that none outlives it)."""
    return list(_SPAWNED)


_SPAWNED: list[int] = []


def _wait_for(context, store, size: int, label: str, timeout_s: float = 300.0) -> None:
    """Wait until every spawned rank has reached the store; a rank that dies on the way is reported at once."""
    keys = [f"joined/{rank}" for rank in range(1, size)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        dead = [i for i, p in enumerate(context.processes) if not p.is_alive()]
        if dead:
            code = context.processes[dead[0]].exitcode
            why = _join(context, 5.0) or f"{dead[0] + 1} failed: exited with code {code}"
            raise LeantrainError(f"{label} {why} (before joining the group)")
        if time.monotonic() > deadline:
            raise LeantrainError(f"{label}s did not start within {timeout_s:.0f} s")
        time.sleep(0.02)


def _communication_error(err: BaseException) -> bool:
    """Whether rank 0 failed because a peer went away (then the worker's own failure is the one to report)."""
    if isinstance(err, dist.DistError):
        return True
    return type(err) is RuntimeError and any(w in str(err) for w in ("gloo", "Connection closed", "Broken pipe"))


def _join(context, timeout_s: float) -> str | None:
    """Wait up to ``timeout_s`` for the spawned ranks; "<rank> <what went wrong>" for the first that failed."""
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                return None
    except Exception as exc:  # noqa: BLE001 - a failed worker, described in one line
        index = getattr(exc, "error_index", None)
        rank = "" if index is None else f"{index + 1} "
        return f"{rank}failed: {_child_error(exc)}"
    return None
