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

Launch (:mod:`leantrain.process_group`, shared with :mod:`leantrain.hetero`): ``leantrain run RECIPE
federated.workers=N`` spawns ranks 1..N-1 on this machine and makes the calling process rank 0; ``torchrun`` starts a
group that also spans machines; a stop request (Ctrl-C) is a decision of all ranks.
"""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from leantrain.errors import ConfigError, LeantrainError
from leantrain.federated.algorithms.base import Reply
from leantrain.federated.engines.base import ClientOutcome, Engine
from leantrain.process_group import world

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


# ---------------------------------------------------------------------------- followers


def _no_evaluation() -> dict[str, float]:
    return {}


def follow(sim) -> None:
    """Make ``sim`` a silent follower rank: no evaluation, checkpoints, logs or per-round callback (rank 0 does
    those); it still trains its share and folds every reply, so its server state stays equal to rank 0's."""
    sim.evaluate = _no_evaluation
    sim.checkpoint_dir, sim.log, sim.on_round = None, None, None
