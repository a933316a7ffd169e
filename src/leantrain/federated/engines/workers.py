"""The cohort's clients spread over several worker processes (torch.distributed, gloo), with the same results.

FedML Parrot's scheme (project spec, federated §9): a few device processes each train their share of the sampled
clients one after another on one model replica, and a heterogeneity-aware schedule balances their work. Here every
rank runs the same :class:`~leantrain.federated.simulator.Simulator` (same seed, data, model, algorithm), so every
rank draws the same cohort and instructions. Each round:

1. **Schedule** (:func:`lpt_schedule`): every client of the cohort gets an estimated cost, and clients are placed
   longest first onto the least-loaded rank. The cost (:class:`CostModel`) is the client's work in samples
   (local steps, or the steps before its injected crash, times ``min(batch, n_i)``; 0 for a client that drops out)
   times the seconds per sample measured so far on clients of its device profile (EmbracingFL's weak clients
   train less of the model). Measured times travel with the outcomes, so every rank holds the same table and
   computes the same assignment.
2. **Train**: each rank trains its clients with the inner engine (sequential by default: ``Simulator.train_one``).
3. **Exchange** (tensors only, never pickles): each rank encodes its outcomes into one uint8 tensor (a JSON header:
   status, failure reason, metrics, the names, dtypes and shapes of the reply's and the client state's tensors;
   then their raw bytes), the ranks all-gather the sizes and each rank broadcasts its buffer. A malformed reply
   (wrong names, shapes, dtypes, NaN) travels as it is, so the server's intake rejects it on every rank alike.
4. Every rank yields ALL outcomes of the cohort (decoded, in cohort order, the rank's own ones too), so the
   simulator's intake folds identical replies on every rank: the server state is identical on all ranks and
   identical to a one-worker run (client training is seeded per (seed, round, client), independent of where
   and after whom it runs).

A client error that stops the run (a ``ConfigError``) or a failure to encode an outcome on one rank is sent to all
ranks, which raise the same one-line error. Rank 0 alone writes checkpoints, logs and metrics and evaluates
(:func:`follow` turns a rank's simulator into a silent follower).

Launch: :func:`launch` (``leantrain run RECIPE federated.workers=N``) spawns ranks 1..N-1 on this machine and
makes the calling process rank 0; :func:`init_from_env` joins a group started by ``torchrun`` (which also spans
machines). :func:`agreed` makes a stop request (Ctrl-C) a decision of all ranks.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from leantrain.errors import ConfigError, LeantrainError
from leantrain.federated.algorithms.base import Reply
from leantrain.federated.engines.base import ClientOutcome, Engine

# dtypes a tensor may travel as (anything else is refused when decoding)
_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
                               torch.complex128, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                               torch.bool)}  # fmt: skip
_OK, _CONFIG_ERROR, _ERROR = 0, 1, 2  # a rank's status in the size exchange


# ---------------------------------------------------------------------------- the schedule


def lpt_schedule(costs: Sequence[float], workers: int) -> list[int]:
    """The worker (rank) of every item: longest processing time first onto the least-loaded worker.

    Items are taken by decreasing cost (ties: lower index first) and each goes to the worker with the least load so
    far (ties: lower rank), so the result depends on the costs alone and every rank computes the same one. Every
    item is assigned exactly once; the makespan is at most 4/3 of the optimum (Graham's bound).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"lpt_schedule workers={workers!r} is invalid; expected an integer >= 1")
    owner = [0] * len(costs)
    loads = [(0.0, rank) for rank in range(workers)]
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        load, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (load + float(costs[i]), rank))
    return owner


class CostModel:
    """Estimated training seconds of a client in a round (Parrot's runtime model, kept simple and online).

    ``samples(sim, r, cid)``: local steps (those before an injected crash; none for a client that drops out) times
    ``min(batch, n_i)``. ``cost = samples x rate(device profile)`` where the rate is the total measured seconds
    over the total samples of earlier clients of that profile (all profiles pooled while a profile has none; 1
    before anything was measured). Updated with the same measured times, in the same order, on every rank.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.samples: dict[str, float] = {}

    @staticmethod
    def work(sim, r: int, cid: int) -> float:
        drops, fail_after = sim.client_fault(r, cid)
        if drops:
            return 0.0
        steps = sim.local.steps if fail_after is None else fail_after
        return float(steps * min(sim.local.batch_size, sim.client_data.num_samples(cid)))

    def rate(self, device: str) -> float:
        if self.samples.get(device, 0) > 0:
            return self.seconds[device] / self.samples[device]
        total = sum(self.samples.values())
        return sum(self.seconds.values()) / total if total > 0 else 1.0

    def costs(self, sim, r: int, cohort: Sequence[int]) -> list[float]:
        return [self.work(sim, r, cid) * self.rate(sim.device_names[cid]) for cid in cohort]

    def observe(self, sim, r: int, cid: int, seconds: float) -> None:
        work = self.work(sim, r, cid)
        if work > 0 and seconds > 0 and np.isfinite(seconds):
            device = sim.device_names[cid]
            self.seconds[device] = self.seconds.get(device, 0.0) + float(seconds)
            self.samples[device] = self.samples.get(device, 0.0) + work


# ---------------------------------------------------------------------------- outcomes as bytes (no pickle)

_OPAQUE: dict[str, type] = {}


def _opaque(type_name: str) -> Any:
    """A stand-in for a reply that is not a well-formed ``Reply`` (its type's name is all that travels): the intake
    rejects it as "not a Reply (<type name>)", as it rejects the original."""
    if type_name not in _OPAQUE:
        _OPAQUE[type_name] = type(type_name, (), {"__repr__": lambda self: f"<{type(self).__name__} from a worker>"})
    return _OPAQUE[type_name]()


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def _put(tensors: list[torch.Tensor], t: torch.Tensor) -> list:
    if str(t.dtype) not in _DTYPES:
        raise LeantrainError(f"a tensor of dtype {t.dtype} cannot travel between federated workers")
    tensors.append(_raw(t))
    return [str(t.dtype), list(t.shape)]


def _metric(value: Any, tensors: list[torch.Tensor]) -> list:
    if value is None or type(value) in (bool, int, float, str):
        return ["j", value]
    if isinstance(value, torch.Tensor):
        return ["t", *_put(tensors, value)]
    if isinstance(value, np.generic) and value.dtype.kind in "biufc":
        return ["n", *_put(tensors, torch.from_numpy(np.asarray(value).copy()))]
    try:
        json.dumps(value)
        return ["j", value]
    except (TypeError, ValueError):
        return ["j", repr(value)]


def _encode_outcome(out: ClientOutcome, seconds: float, tensors: list[torch.Tensor]) -> dict:
    head: dict[str, Any] = {"cid": int(out.cid), "why": None if out.why is None else str(out.why),
                            "seconds": float(seconds), "reply": None, "state": None}  # fmt: skip
    reply = out.reply
    if reply is not None:
        well_formed = isinstance(reply, Reply) and isinstance(reply.arrays, dict) and isinstance(reply.metrics, dict)
        if well_formed and all(isinstance(t, torch.Tensor) and str(t.dtype) in _DTYPES for t in reply.arrays.values()):
            head["reply"] = {"arrays": [[str(k), *_put(tensors, t)] for k, t in reply.arrays.items()],
                             "metrics": [[k, *_metric(v, tensors)] for k, v in reply.metrics.items()]}  # fmt: skip
        else:
            head["reply"] = {"opaque": type(reply).__name__}
    if out.state is not None:
        bad = [k for k, t in out.state.items() if not isinstance(t, torch.Tensor)]
        if bad:
            raise LeantrainError(f"client {out.cid}'s state holds {bad[:3]}, which are not tensors; client state "
                                 "must be tensors to travel between federated workers")  # fmt: skip
        head["state"] = [[str(k), *_put(tensors, t)] for k, t in out.state.items()]
    return head


def encode_outcomes(outcomes: Sequence[tuple[ClientOutcome, float]]) -> torch.Tensor:
    """(outcome, measured seconds) pairs as one uint8 tensor: 8 bytes of header length, a JSON header, raw bytes."""
    tensors: list[torch.Tensor] = []
    heads = [_encode_outcome(out, seconds, tensors) for out, seconds in outcomes]
    header = json.dumps({"outcomes": heads, "sizes": [t.numel() for t in tensors]}).encode()
    parts = [torch.frombuffer(bytearray(len(header).to_bytes(8, "little") + header), dtype=torch.uint8), *tensors]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class _Reader:
    def __init__(self, blob: torch.Tensor, offset: int, sizes: list[int]):
        self.blob, self.offset, self.sizes, self.i = blob, offset, sizes, 0

    def tensor(self, dtype_name: str, shape: list[int]) -> torch.Tensor:
        if dtype_name not in _DTYPES or self.i >= len(self.sizes):
            raise LeantrainError(f"a federated worker sent a malformed message (tensor of dtype {dtype_name!r})")
        dtype, n = _DTYPES[dtype_name], int(self.sizes[self.i])
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if n != numel * torch.empty((), dtype=dtype).element_size() or self.offset + n > self.blob.numel():
            raise LeantrainError("a federated worker sent a malformed message (tensor sizes disagree)")
        chunk = self.blob[self.offset : self.offset + n].clone()
        self.offset, self.i = self.offset + n, self.i + 1
        return chunk.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


def _decode_metric(kind: str, rest: list, reader: _Reader) -> Any:
    if kind == "j":
        return rest[0]
    t = reader.tensor(rest[0], rest[1])
    return t if kind == "t" else t.numpy()[()]


def decode_outcomes(blob: torch.Tensor) -> list[tuple[ClientOutcome, float]]:
    """Inverse of :func:`encode_outcomes` (JSON and raw tensor bytes only: nothing is unpickled)."""
    try:
        length = int.from_bytes(blob[:8].numpy().tobytes(), "little")
        header = json.loads(blob[8 : 8 + length].numpy().tobytes().decode())
        reader = _Reader(blob, 8 + length, [int(s) for s in header["sizes"]])
        out = []
        for head in header["outcomes"]:
            reply, state = head["reply"], head["state"]
            if reply is not None:
                if "opaque" in reply:
                    reply = _opaque(str(reply["opaque"]))
                else:
                    arrays = {name: reader.tensor(d, s) for name, d, s in reply["arrays"]}
                    metrics = {k: _decode_metric(kind, rest, reader) for k, kind, *rest in reply["metrics"]}
                    reply = Reply(arrays, metrics)
            if state is not None:
                state = {name: reader.tensor(d, s) for name, d, s in state}
            out.append((ClientOutcome(int(head["cid"]), reply, head["why"], state), float(head["seconds"])))
    except (KeyError, TypeError, ValueError, IndexError, UnicodeDecodeError) as err:
        raise LeantrainError(f"a federated worker sent a malformed message ({type(err).__name__}: {err})") from None
    return out


# ---------------------------------------------------------------------------- the engine


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class WorkersEngine(Engine):
    """Trains the cohort spread over the ranks of the default process group, each with the ``inner`` engine.

    Every rank yields every client's outcome (see the module's docstring); with one process (no group initialised)
    it is the inner engine. Results equal one process's when a client's training depends only on its instruction,
    its state and its seeds, not on what the working model held before (the property every engine relies on), and
    the inner engine gives each client the same result whoever trains beside it (sequential does; the vectorised
    engine agrees to float rounding).
    """

    name = "workers"

    def __init__(self, inner: str | Engine = "sequential"):
        from leantrain.federated.engines import make_engine

        self.inner = make_engine(inner)
        if isinstance(self.inner, WorkersEngine):  # the clients are spread once
            self.inner = self.inner.inner
        self.costs = CostModel()
        self.last_assignment: dict[int, int] = {}  # client id -> rank, of the latest round
        self.loads: list[list[float]] = []  # per round: measured training seconds of each rank
        self.ipc_bytes = 0  # simulator IPC (every rank's outcome buffers), apart from the FL ledger (spec §9.4)

    def describe(self) -> str:
        size = world()[1]
        if size == 1:
            return f"{self.inner.describe()} (one worker process)"
        return f"{size} worker processes (LPT schedule), each {self.inner.describe()}"

    def train(self, sim, round_idx, cohort, instructions) -> Iterator[ClientOutcome]:
        from leantrain.federated.simulator import seed_for, seed_torch

        rank, size = world()
        if size == 1:
            yield from self.inner.train(sim, round_idx, cohort, instructions)
            return
        owners = lpt_schedule(self.costs.costs(sim, round_idx, cohort), size)
        self.last_assignment = dict(zip(cohort, owners, strict=True))
        mine = [cid for cid, owner in zip(cohort, owners, strict=True) if owner == rank]
        status, blob, error = _OK, None, None
        try:
            done = []
            started = time.perf_counter()
            trained = self.inner.train(sim, round_idx, mine, {cid: instructions[cid] for cid in mine}) if mine else ()
            for out in trained:
                now = time.perf_counter()
                done.append((out, now - started))
                started = now
            if sorted(out.cid for out, _ in done) != sorted(mine):
                raise LeantrainError(f"engine {self.inner.name} did not return one outcome per assigned client")
            blob = encode_outcomes(done)
        except Exception as err:  # noqa: BLE001 - sent to every rank, then raised everywhere
            status = _CONFIG_ERROR if isinstance(err, ConfigError) else _ERROR
            error = err
            blob = torch.frombuffer(bytearray(f"{type(err).__name__}: {err}".encode()), dtype=torch.uint8)
        heads = [torch.zeros(2, dtype=torch.int64) for _ in range(size)]
        dist.all_gather(heads, torch.tensor([status, blob.numel()], dtype=torch.int64))
        failed = [k for k, h in enumerate(heads) if int(h[0]) != _OK]
        if failed:
            k = failed[0]
            buf = blob if k == rank else torch.empty(int(heads[k][1]), dtype=torch.uint8)
            dist.broadcast(buf, src=k)
            if error is not None:
                raise error
            message = buf.numpy().tobytes().decode(errors="replace")
            if int(heads[k][0]) == _CONFIG_ERROR:
                raise ConfigError(message.partition(": ")[2] or message)
            raise LeantrainError(f"federated worker {k} failed in round {round_idx + 1}: {message}")
        by_cid: dict[int, tuple[ClientOutcome, float]] = {}
        for k in range(size):
            buf = blob if k == rank else torch.empty(int(heads[k][1]), dtype=torch.uint8)
            dist.broadcast(buf, src=k)
            self.ipc_bytes += buf.numel()
            for out, seconds in decode_outcomes(buf):
                if self.last_assignment.get(out.cid) != k or out.cid in by_cid:
                    raise LeantrainError(f"federated worker {k} sent an outcome for client {out.cid}, "
                                         "which it was not assigned")  # fmt: skip
                by_cid[out.cid] = (out, seconds)
        loads = [0.0] * size
        for cid in cohort:
            self.costs.observe(sim, round_idx, cid, by_cid[cid][1])
            loads[self.last_assignment[cid]] += by_cid[cid][1]
        self.loads.append(loads)
        # Every rank leaves the global RNG in one state (not the one a single process leaves: the server's own draws
        # are seeded explicitly; this keeps the ranks alike should anything draw from it before the next round).
        seed_torch(seed_for(sim.seed, round_idx, 2))
        for cid in cohort:
            yield by_cid[cid][0]


# ---------------------------------------------------------------------------- ranks: followers, stop, launch


def _no_evaluation() -> dict[str, float]:
    return {}


def follow(sim) -> None:
    """Make ``sim`` a silent follower rank: no evaluation, checkpoints, logs or per-round callback (rank 0 does
    those); it still trains its share and folds every reply, so its server state stays equal to rank 0's."""
    sim.evaluate = _no_evaluation
    sim.checkpoint_dir, sim.log, sim.on_round = None, None, None


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


def init_from_env() -> tuple[int, int]:
    """Join the process group ``torchrun`` set up (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); (rank, size)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")
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


def _spawned(index: int, fn: Callable, host: str, port: int, size: int, threads: int | None, args: tuple) -> None:
    """Entry point of a spawned rank (``index + 1``): one thread, no Ctrl-C of its own, join the group, run."""
    import signal
    from datetime import timedelta

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when to stop (see agreed); it ends us if need be
    set_worker_threads(threads)
    rank = index + 1
    store = dist.TCPStore(host, port, size, is_master=False, timeout=timedelta(seconds=300))
    store.set(f"joined/{rank}", "1")
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size)
    try:
        fn(rank, size, *args)
    finally:
        dist.destroy_process_group()


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
def launch(fn: Callable, size: int, args: tuple = (), threads: int | None = None,
           timeout_s: float = 1800.0) -> Iterator[int]:  # fmt: skip
    """Spawn ranks 1..size-1 on this machine running ``fn(rank, size, *args)`` (a module-level function) and make
    this process rank 0 of a gloo group for the ``with`` block (yields the size).

    A failure of any rank is raised here as one :class:`LeantrainError` naming the worker; on leaving the block
    (normally or not) the group is destroyed and the workers are joined (ended if they outlive rank 0).
    """
    from datetime import timedelta

    import torch.multiprocessing as mp

    if dist.is_initialized():
        raise ConfigError("federated workers: a torch.distributed process group is already running in this process")
    previous_threads = torch.get_num_threads()
    set_worker_threads(threads)
    host = "127.0.0.1"
    store = dist.TCPStore(host, 0, size, is_master=True, timeout=timedelta(seconds=300), wait_for_workers=False)
    context = mp.start_processes(_spawned, args=(fn, host, store.port, size, threads, args), nprocs=size - 1,
                                 join=False, start_method="spawn")  # fmt: skip
    try:
        try:
            _wait_for(context, store, size)
            dist.init_process_group("gloo", store=store, rank=0, world_size=size, timeout=timedelta(seconds=timeout_s))
            yield size
        except BaseException as err:
            if dist.is_initialized():
                dist.destroy_process_group()  # workers waiting on rank 0 get an error now, not after the timeout
            why = _join(context, 10.0)
            if why is not None and _communication_error(err):
                raise LeantrainError(f"federated worker {why}") from None
            raise
        dist.destroy_process_group()
        why = _join(context, 120.0)
        if why is not None:
            raise LeantrainError(f"federated worker {why}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for p in context.processes:
            if p.is_alive():
                p.terminate()
        for p in context.processes:
            p.join(5)
        torch.set_num_threads(previous_threads)


def _wait_for(context, store, size: int, timeout_s: float = 300.0) -> None:
    """Wait until every spawned rank has reached the store; a rank that dies on the way is reported at once."""
    keys = [f"joined/{rank}" for rank in range(1, size)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        dead = [i for i, p in enumerate(context.processes) if not p.is_alive()]
        if dead:
            code = context.processes[dead[0]].exitcode
            why = _join(context, 5.0) or f"{dead[0] + 1} failed: exited with code {code}"
            raise LeantrainError(f"federated worker {why} (before joining the group)")
        if time.monotonic() > deadline:
            raise LeantrainError(f"federated workers did not start within {timeout_s:.0f} s")
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
