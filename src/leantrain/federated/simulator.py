"""The embedded federated simulator: many clients, one working model, a byte ledger and a simulated clock.

Design after FedML Parrot (Tang et al., "FedML Parrot: A Scalable Federated Learning System via
Heterogeneity-aware Scheduling on Sequential and Hierarchical Training", arXiv 2303.01778): the sampled clients of a
round are trained one after another on a single working model, the server aggregates their replies as they arrive
(streaming, nothing per client is kept), and per-client state of stateful algorithms is stored per client id and
restored when that client runs again. Memory therefore does not grow with the number of clients beyond their data
indices and whatever state the algorithm keeps.

Determinism: the cohort of round r is drawn by a generator seeded with (seed, r), so every algorithm sees the same
cohorts; a client's batch order, its dropout masks and the injected faults are seeded with (seed, r, client). A
run resumed from its round checkpoint therefore produces the same history as an uninterrupted one.

Faults: ``dropout`` is the probability a sampled client vanishes after receiving the model (its downlink is
counted, it never replies); ``failure`` the probability it crashes mid-training (after a random number of local
steps); ``fault_hook(round, cid, reply) -> reply`` may tamper with replies (tests use it to send wrong shapes,
NaN/inf or wrong dtypes). Any exception raised by a client's update marks that client failed for the round
(logged with its id and reason); the run goes on. Every reply is checked against what the algorithm expects and
against the :class:`~leantrain.federated.intake.ReplyGuard` (update norm against the cohort, capped sample counts);
a rejected one is counted (its bytes did travel), logged in the round's ``events`` and dropped without touching the
server state.

Engines (``engine=``): "sequential" trains the cohort's clients one after another; "auto" (default) picks the
fastest engine that gives the same results (see :mod:`leantrain.federated.engines`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leantrain.errors import ConfigError, LeantrainError
from leantrain.federated.algorithms.base import Algorithm, ClientContext, Instruction, Reply, train_client
from leantrain.federated.client import ClientData, LocalTraining
from leantrain.federated.clock import SimulatedClock, assign_profiles, profile
from leantrain.federated.comm import ByteLedger
from leantrain.federated.engines import DROPPED, ClientOutcome, Engine, make_engine
from leantrain.federated.intake import ReplyGuard, RoundIntake

LAST_WINDOW = 10  # accuracy is also reported as the mean of the last this-many evaluated rounds


class ClientFailure(RuntimeError):
    """An injected mid-round client crash."""


@dataclass
class FederatedData:
    """Training rows, test rows and the per-client partition of the training rows."""

    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    parts: list[np.ndarray]
    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None


def federated_data(dataset: Any, partition: Any, num_clients: int, seed: int = 0, train_subset: int | None = None,
                   eval_split: str = "test", **partition_options: Any) -> FederatedData:  # fmt: skip
    """Build the simulator's data from a dataset name (or a leantrain ``Dataset``) and a partition.

    ``partition`` is "iid", "dirichlet" (``alpha=...``), "shards", or an explicit list of index arrays.
    ``eval_split``: the rows the global model is evaluated on ("test", or "val" to choose hyperparameters without
    looking at the test rows); they land in ``FederatedData.test``.
    """
    from leantrain.data import load_dataset
    from leantrain.data.partition import partition as split

    ds = load_dataset(dataset, seed=seed, train_subset=train_subset) if isinstance(dataset, str) else dataset
    if ds.train.y is None:
        raise ConfigError(f"dataset {ds.name!r} has no labels; the federated simulator needs a classification set")
    train = {"x": torch.as_tensor(ds.train.x), "labels": torch.as_tensor(ds.train.y)}
    if eval_split not in ("test", "val"):
        raise ConfigError(f"eval_split={eval_split!r} is invalid; expected 'test' or 'val'")
    rows = ds.test if eval_split == "test" else ds.val
    test = {"x": torch.as_tensor(rows.x), "labels": torch.as_tensor(rows.y)}
    if isinstance(partition, str):
        if partition == "dirichlet":
            partition_options.setdefault("min_size", 1)
        parts = split(partition, ds.train.y, num_clients, seed=seed, **partition_options)
    else:
        parts = [np.asarray(p, dtype=np.int64) for p in partition]
        if len(parts) != num_clients:
            raise ConfigError(f"the partition has {len(parts)} clients but num_clients={num_clients}")
    return FederatedData(train, test, parts, ds.num_classes, ds.input_shape)


@dataclass
class History:
    """Per-round records and the run's totals."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)

    def last(self, key: str) -> Any:
        """The most recent value of ``key`` (e.g. "test_accuracy"), or None."""
        for row in reversed(self.rounds):
            if row.get(key) is not None:
                return row[key]
        return None

    def window_mean(self, key: str, window: int = LAST_WINDOW) -> float | None:
        """The mean of the last ``window`` recorded values of ``key`` (fewer if fewer exist), or None.

        Final values of a federated run swing by several points from round to round with a small cohort; the mean
        over the last evaluated rounds is the steadier figure to compare algorithms by.
        """
        values = [row[key] for row in self.rounds if row.get(key) is not None][-window:]
        return float(np.mean(values)) if values else None


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers: (seed, round) for cohorts, (seed, round, client) for a client's batches,
    (seed, round, client, 1) for its dropout masks. Both runtimes (simulator, Flower) derive seeds with it."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def seed_torch(seed: int) -> None:
    """Seed torch's CPU generator, which client code draws from (dropout masks, sampling): the per-client seeding of
    every runtime. ``torch.manual_seed`` sets the same CPU state but also queues CUDA/XPU/MTIA seeding, recording a
    stack trace each time: 0.4-1.3 ms per call here, more than a small client's whole local update."""
    torch.default_generator.manual_seed(seed)


@torch.no_grad()
def evaluate_state(model: nn.Module, state: dict[str, torch.Tensor], test: dict[str, torch.Tensor],
                   batch_size: int = 1000) -> dict[str, float]:  # fmt: skip
    """Load ``state`` into ``model`` and return its mean cross-entropy and accuracy on the ``test`` rows."""
    from leantrain.federated.algorithms.base import load_arrays

    load_arrays(model, dict(state))
    model.eval()
    x, y = test["x"], test["labels"]
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
    return {"loss": loss_sum / len(y), "accuracy": correct / len(y)}


class _FailingBatches:
    """Yields ``ok`` batches, then raises :class:`ClientFailure` (an injected mid-round crash)."""

    def __init__(self, batches, ok: int):
        self.batches, self.ok = batches, ok

    def __iter__(self):
        return self

    def __next__(self):
        if self.ok <= 0:
            raise ClientFailure("injected client failure mid-round")
        self.ok -= 1
        return next(self.batches)


class Simulator:
    """Run ``algorithm`` for ``rounds`` rounds over ``num_clients`` clients, ``clients_per_round`` at a time.

    ``model_fn()`` builds the model (called once under ``torch.manual_seed(seed)``); ``dataset`` is a dataset name,
    a leantrain ``Dataset`` or a :class:`FederatedData`; ``partition`` "iid" / "dirichlet" / "shards" / index
    arrays (options in ``partition_options``). ``local_steps`` is τ; ``devices`` maps profile name -> share of
    clients (e.g. ``{"weak": 0.5, "moderate": 0.25}``; the rest are strong). ``checkpoint_dir``: the server state
    is saved after every round and ``run(resume=True)`` continues from the latest one. ``engine``: how a cohort is
    trained (:mod:`leantrain.federated.engines`; results do not depend on it). ``guard``: the server's guards
    against absurd replies (default ``ReplyGuard()``: update norm at most 100x the cohort's median, sample counts
    capped at the client's known dataset size; ``ReplyGuard.off()`` disables them).
    """

    def __init__(
        self,
        algorithm: Algorithm,
        model_fn: Callable[[], nn.Module],
        dataset: Any,
        partition: Any = "iid",
        num_clients: int = 100,
        clients_per_round: int = 10,
        rounds: int = 50,
        local_steps: int = 10,
        batch_size: int = 32,
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        partition_options: dict[str, Any] | None = None,
        train_subset: int | None = None,
        devices: dict[str, float] | None = None,
        dropout: float = 0.0,
        failure: float = 0.0,
        fault_hook: Callable[[int, int, Reply], Reply] | None = None,
        eval_every: int = 1,
        eval_batch_size: int = 1000,
        sample_time_s: float = 1e-3,
        seed: int = 0,
        checkpoint_dir: str | Path | None = None,
        log: Callable[[str], None] | None = None,
        log_every: int = 1,
        checkpoint_every: int = 1,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        engine: str | Engine = "auto",
        guard: ReplyGuard | None = None,
    ):
        if not isinstance(algorithm, Algorithm):
            raise ConfigError(f"algorithm={algorithm!r} is not a leantrain federated Algorithm")
        counts = {"num_clients": num_clients, "clients_per_round": clients_per_round, "rounds": rounds,
                  "eval_every": eval_every, "log_every": log_every, "checkpoint_every": checkpoint_every}  # fmt: skip
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Simulator {name}={value!r} is invalid; expected an integer >= 1")
        if clients_per_round > num_clients:
            raise ConfigError(f"clients_per_round={clients_per_round} exceeds num_clients={num_clients}")
        for name, p in (("dropout", dropout), ("failure", failure)):
            if not isinstance(p, int | float) or isinstance(p, bool) or not 0 <= p < 1:
                raise ConfigError(f"Simulator {name}={p!r} is invalid; expected a probability in [0, 1)")
        self.algorithm = algorithm
        self.local = LocalTraining(local_steps, batch_size, lr, momentum, weight_decay)
        self.num_clients, self.clients_per_round, self.rounds = num_clients, clients_per_round, rounds
        self.dropout, self.failure, self.fault_hook = float(dropout), float(failure), fault_hook
        self.eval_every, self.eval_batch_size, self.seed = eval_every, eval_batch_size, seed
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.log, self.log_every, self.on_round = log, log_every, on_round
        self.checkpoint_every = checkpoint_every
        self.guard = guard if guard is not None else ReplyGuard()
        self.engine = make_engine(engine)
        if isinstance(dataset, FederatedData):
            self.data = dataset
            if len(dataset.parts) != num_clients:
                raise ConfigError(f"the data has {len(dataset.parts)} client parts but num_clients={num_clients}")
        else:
            self.data = federated_data(dataset, partition, num_clients, seed, train_subset,
                                       **(partition_options or {}))  # fmt: skip
        self.client_data = ClientData(self.data.train, self.data.parts)
        torch.manual_seed(seed)
        self.model = model_fn()  # the one working model every client trains on in turn
        self.device_names = assign_profiles(num_clients, devices, seed)
        self.devices = [profile(n) for n in self.device_names]
        self.clock = SimulatedClock(sample_time_s)
        self.ledger = ByteLedger()
        self.history = History()
        self.client_states: dict[int, dict[str, torch.Tensor]] = {}
        self.algorithm.setup(self.model, num_clients, self.devices)
        self.algorithm.seed = seed
        from leantrain.train.tasks import ClassificationTask

        self.loss_fn = ClassificationTask().loss
        self.next_round = 0

    # ------------------------------------------------------------------ one round

    def client_fault(self, r: int, cid: int) -> tuple[bool, int | None]:
        """The injected faults of client ``cid`` in round ``r``: (drops out, fails after this many local steps).

        Seeded with (seed, round, client), so every engine injects the same faults."""
        fault = np.random.default_rng(seed_for(self.seed, r, cid, 7))
        if fault.random() < self.dropout:
            return True, None
        if fault.random() < self.failure:
            return False, int(fault.integers(0, self.local.steps))
        return False, None

    def client_batches(self, r: int, cid: int):
        """Client ``cid``'s endless batch stream in round ``r`` (seeded with (seed, round, client))."""
        return self.client_data.batches(cid, self.local.batch_size, seed_for(self.seed, r, cid))

    def client_context(self, r: int, cid: int, batches) -> ClientContext:
        """What ``client_update`` gets: the working model, the batches, n_i, the local settings and its state."""
        return ClientContext(cid, r, self.model, batches, self.client_data.num_samples(cid), self.local,
                             self.loss_fn, self.devices[cid], dict(self.client_states.get(cid, {})))  # fmt: skip

    def train_one(self, r: int, cid: int, instruction: Instruction) -> ClientOutcome:
        """Train client ``cid`` on the working model: its reply, or why it did not reply.

        Any exception from the client's update (an injected crash, a non-finite loss, a bug in the algorithm's
        client code, a bad model) marks the client failed, with the exception's type and message as the reason;
        a :class:`~leantrain.errors.ConfigError` (the run is misconfigured, every client would fail) propagates.
        """
        drops, fail_after = self.client_fault(r, cid)
        if drops:
            return ClientOutcome(cid, why=DROPPED)
        batches = self.client_batches(r, cid)
        if fail_after is not None:
            batches = _FailingBatches(batches, fail_after)
        ctx = self.client_context(r, cid, batches)
        seed_torch(seed_for(self.seed, r, cid, 1))
        try:
            reply = train_client(self.algorithm, ctx, instruction)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - a client's failure must not stop the server
            return ClientOutcome(cid, why=f"{type(err).__name__}: {err}")
        return ClientOutcome(cid, self.tamper(r, cid, reply), state=ctx.state)

    def tamper(self, r: int, cid: int, reply: Reply) -> Reply:
        """The reply as it arrives at the server (``fault_hook`` applied, if any)."""
        return self.fault_hook(r, cid, reply) if self.fault_hook is not None else reply

    def run_round(self, r: int) -> dict[str, Any]:
        started = time.perf_counter()
        rng = np.random.default_rng(seed_for(self.seed, r))
        cohort = self.algorithm.sample(r, self.clients_per_round, rng, list(range(self.num_clients)))
        instructions = self.algorithm.configure(r, cohort)
        intake = RoundIntake(self.algorithm, r, self.guard, self.client_data.num_samples)
        down = {cid: self.ledger.record(r, cid, "down", instructions[cid].arrays, instructions[cid].config)
                for cid in cohort}  # fmt: skip
        up, states = {}, {}
        for out in self.engine.train(self, r, cohort, instructions):
            cid = out.cid
            if out.reply is None:
                intake.dropped(cid) if out.why == DROPPED else intake.failed(cid, str(out.why))
                continue
            up[cid] = self.ledger.record(r, cid, "up", out.reply.arrays if isinstance(out.reply, Reply) else {})
            if intake.offer(cid, instructions[cid], out.reply) is None:
                states[cid] = out.state
        accepted = intake.close()
        losses, times = [], []
        for cid, reply in accepted.items():
            if states.get(cid):
                self.client_states[cid] = states[cid]
            else:
                self.client_states.pop(cid, None)
            losses.append(float(reply.metrics.get("loss", float("nan"))))
            work = float(reply.metrics.get("work", 1.0))
            times.append(self.clock.client_time(self.devices[cid], int(reply.metrics.get("samples", 0)), work,
                                                down[cid], up[cid], 2))  # fmt: skip
        self.algorithm.aggregate(r)
        duration = self.clock.advance(times)
        row = {"round": r, "cohort": len(cohort), **intake.counts, **self.ledger.round_totals(r),
               "train_loss": float(np.nanmean(losses)) if losses else None, "round_time_s": duration,
               "sim_time_s": self.clock.now, "events": intake.events, "engine": self.engine.describe()}  # fmt: skip
        if (r + 1) % self.eval_every == 0 or r + 1 == self.rounds:
            row.update({f"test_{k}": v for k, v in self.evaluate().items()})
        row["wall_s"] = time.perf_counter() - started
        return row

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy of the algorithm's evaluation model on the test rows."""
        return evaluate_state(self.model, self.algorithm.eval_state(), self.data.test, self.eval_batch_size)

    # ------------------------------------------------------------------ the run, checkpoints

    def run(self, resume: bool = False, stop_after: int | None = None,
            should_stop: Callable[[], bool] | None = None) -> History:  # fmt: skip
        """Run the remaining rounds (all of them, or from the latest checkpoint with ``resume=True``).

        ``stop_after=n`` stops once ``n`` rounds are done (a time box; ``run(resume=True)`` continues later);
        ``should_stop()`` is asked after every round (Ctrl-C): the state is then checkpointed and the run stops.
        With a ``checkpoint_dir`` the state is saved every ``checkpoint_every`` rounds and whenever the run stops.
        """
        if resume:
            self.restore()
        last = self.rounds if stop_after is None else min(self.rounds, stop_after)
        for r in range(self.next_round, last):
            row = self.run_round(r)
            self.history.rounds.append(row)
            self.next_round = r + 1
            stopping = r + 1 == last or (should_stop is not None and should_stop())
            if self.checkpoint_dir is not None and ((r + 1) % self.checkpoint_every == 0 or stopping):
                self.save()
            if self.on_round is not None:
                self.on_round(row)
            if self.log is not None and ((r + 1) % self.log_every == 0 or r + 1 == self.rounds):
                self.log(self._progress_line(row))
            if stopping:
                break
        self.history.totals = {**self.ledger.totals(), "sim_time_s": self.clock.now,
                               "final_test_accuracy": self.history.last("test_accuracy"),
                               "last10_test_accuracy": self.history.window_mean("test_accuracy")}  # fmt: skip
        return self.history

    def _progress_line(self, row: dict[str, Any]) -> str:
        acc = row.get("test_accuracy")
        parts = [f"round {row['round'] + 1}/{self.rounds}:"]
        if acc is not None:
            parts.append(f"test accuracy {acc:.4f},")
        parts.append(f"up {row['up_bytes'] / 1e6:.2f} MB, down {row['down_bytes'] / 1e6:.2f} MB,")
        parts.append(f"simulated {self.clock.now:.1f} s")
        if row["events"]:
            parts.append(
                f"({len(row['events'])} events: {row['events'][0]}{', ...' if len(row['events']) > 1 else ''})"
            )
        return " ".join(parts)

    def _state(self) -> dict[str, Any]:
        return {
            "next_round": self.next_round,
            "algorithm": self.algorithm.state_dict(),
            "ledger": self.ledger.state_dict(),
            "history": self.history.rounds,
            "clock": self.clock.now,
            "client_states": self.client_states,
        }

    def save(self) -> Path:
        from leantrain.train.checkpoint import save_state_checkpoint

        return save_state_checkpoint(self.checkpoint_dir, self.next_round, self._state())

    def restore(self, path: Path | None = None) -> bool:
        """Load the round checkpoint ``path`` (default: the latest in ``checkpoint_dir``); False if there is none."""
        from leantrain.train.checkpoint import list_checkpoints, load_state_checkpoint

        if path is None:
            if self.checkpoint_dir is None:
                raise LeantrainError("resume needs checkpoint_dir")
            found = list_checkpoints(self.checkpoint_dir)
            if not found:
                return False
            path = found[-1]
        _, state = load_state_checkpoint(path)
        self.algorithm.load_state_dict(state["algorithm"])
        self.ledger.load_state_dict(state["ledger"])
        self.history.rounds = state["history"]
        self.clock.now = state["clock"]
        self.client_states = {int(k): v for k, v in state["client_states"].items()}
        self.next_round = state["next_round"]
        return True
