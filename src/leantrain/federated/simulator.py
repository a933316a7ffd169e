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
from leantrain.federated.asynchronous import AsyncRuntime
from leantrain.federated.client import ClientData, LocalTraining
from leantrain.federated.clock import DeviceProfile, SimulatedClock, assign_profiles, profile
from leantrain.federated.comm import ByteLedger, message_nbytes
from leantrain.federated.engines import DROPPED, ClientOutcome, Engine, make_engine
from leantrain.federated.intake import ReplyGuard, RoundIntake


def _mean(values: list[float]) -> float | None:
    return float(np.nanmean(values)) if values else None


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
    unlabeled_parts: list[np.ndarray] | None = None  # per client: training rows it holds without their labels


def federated_data(dataset: Any, partition: Any, num_clients: int, seed: int = 0, train_subset: int | None = None,
                   eval_split: str = "test", unlabeled_share: float = 0.0, unlabeled_holders: list[int] | None = None,
                   **partition_options: Any) -> FederatedData:  # fmt: skip
    """Build the simulator's data from a dataset name (or a leantrain ``Dataset``) and a partition.

    ``partition`` is "iid", "dirichlet" (``alpha=...``), "shards", or an explicit list of index arrays.
    ``eval_split``: the rows the global model is evaluated on ("test", or "val" to choose hyperparameters without
    looking at the test rows); they land in ``FederatedData.test``.
    ``unlabeled_share``: this share of the training rows (a seeded random draw) is taken out of the labeled
    partition and split, by the same partition rule, among ``unlabeled_holders`` (client ids; default all) as their
    unlabeled rows (``ClientContext.unlabeled``; on-device KD distils on them). Every client keeps labeled rows.
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
    if not isinstance(unlabeled_share, int | float) or not 0 <= unlabeled_share < 1:
        raise ConfigError(f"unlabeled_share={unlabeled_share!r} is invalid; expected a share in [0, 1)")
    labels = np.asarray(ds.train.y)
    rows = np.arange(len(labels))
    unlabeled_rows = np.zeros(0, dtype=np.int64)
    if unlabeled_share > 0:
        if not isinstance(partition, str):
            raise ConfigError("unlabeled_share needs a named partition (iid, dirichlet, shards)")
        picked = np.random.default_rng(seed_for(seed, 3)).random(len(rows)) < unlabeled_share
        rows, unlabeled_rows = rows[~picked], rows[picked]
    if isinstance(partition, str):
        if partition == "dirichlet":
            partition_options.setdefault("min_size", 1)
        parts = [rows[p] for p in split(partition, labels[rows], num_clients, seed=seed, **partition_options)]
    else:
        parts = [np.asarray(p, dtype=np.int64) for p in partition]
        if len(parts) != num_clients:
            raise ConfigError(f"the partition has {len(parts)} clients but num_clients={num_clients}")
    unlabeled_parts = None
    if unlabeled_share > 0:
        holders = list(range(num_clients)) if unlabeled_holders is None else sorted(set(unlabeled_holders))
        if not holders or min(holders) < 0 or max(holders) >= num_clients:
            raise ConfigError(f"unlabeled_holders must be client ids in 0..{num_clients - 1}; got {unlabeled_holders}")
        held = split(partition, labels[unlabeled_rows], len(holders), seed=seed + 1, **partition_options)
        unlabeled_parts = [np.zeros(0, dtype=np.int64) for _ in range(num_clients)]
        for holder, part in zip(holders, held, strict=True):
            unlabeled_parts[holder] = unlabeled_rows[part]
    return FederatedData(train, test, parts, ds.num_classes, ds.input_shape, unlabeled_parts)


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


def batch_seed(seed: int, round_idx: int, cid: int, phase_index: int = 0) -> int:
    """The seed of client ``cid``'s batch order in round ``round_idx`` (phase ``phase_index`` of a multi-phase round;
    the first phase keeps the single-phase seed, so one-phase algorithms are unchanged)."""
    return seed_for(seed, round_idx, cid) if phase_index == 0 else seed_for(seed, round_idx, cid, 100 + phase_index)


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

    ``model_fn()`` builds the model (called once under ``torch.manual_seed(seed)``); ``dataset`` is a dataset name, a
    leantrain ``Dataset`` or a :class:`FederatedData`; ``partition`` "iid" / "dirichlet" / "shards" / index arrays
    (options in ``partition_options``). ``local_steps`` is τ; ``devices`` maps profile name -> share of clients (e.g.
    ``{"weak": 0.5, "moderate": 0.25}``; the rest are strong), or is a list of one
    :class:`~leantrain.federated.clock.DeviceProfile` per client
    (:func:`~leantrain.federated.clock.lognormal_profiles`). ``availability``: the probability a client is online in a
    round (a seeded draw per round; the cohort is sampled from the online ones). ``time_budget_s``: stop once the
    simulated clock reaches it (``rounds`` stays the cap). ``checkpoint_dir``: the server state is saved after every
    round and ``run(resume=True)`` continues from the latest one. ``engine``: how a cohort is trained
    (:mod:`leantrain.federated.engines`; results do not depend on it). ``guard``: the server's guards against absurd
    replies (default ``ReplyGuard()``: update norm at most 100x the cohort's median, sample counts capped at the
    client's known dataset size; ``ReplyGuard.off()`` disables them).
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
        devices: dict[str, float] | list[DeviceProfile] | None = None,
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
        availability: float = 1.0,
        time_budget_s: float | None = None,
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
        if not isinstance(availability, int | float) or isinstance(availability, bool) or not 0 < availability <= 1:
            raise ConfigError(f"Simulator availability={availability!r} is invalid; expected a probability in (0, 1]")
        if time_budget_s is not None and not time_budget_s > 0:
            raise ConfigError(f"Simulator time_budget_s={time_budget_s!r} is invalid; expected > 0 or None")
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
        self.availability, self.time_budget_s = float(availability), time_budget_s
        self.guard = guard if guard is not None else ReplyGuard()
        self.engine = make_engine(engine)
        if isinstance(dataset, FederatedData):
            self.data = dataset
            if len(dataset.parts) != num_clients:
                raise ConfigError(f"the data has {len(dataset.parts)} client parts but num_clients={num_clients}")
        else:
            self.data = federated_data(dataset, partition, num_clients, seed, train_subset,
                                       **(partition_options or {}))  # fmt: skip
        self.client_data = ClientData(self.data.train, self.data.parts, self.data.unlabeled_parts)
        torch.manual_seed(seed)
        self.model = model_fn()  # the one working model every client trains on in turn
        if isinstance(devices, list):  # one profile per client (e.g. clock.lognormal_profiles)
            if len(devices) != num_clients or not all(isinstance(d, DeviceProfile) for d in devices):
                raise ConfigError(f"devices: a list needs one DeviceProfile per client ({num_clients})")
            self.devices = list(devices)
            self.device_names = [d.name for d in devices]
        else:
            self.device_names = assign_profiles(num_clients, devices, seed)
            self.devices = [profile(n) for n in self.device_names]
        self.clock = SimulatedClock(sample_time_s)
        self.ledger = ByteLedger()
        self.history = History()
        self.client_states: dict[int, dict[str, torch.Tensor]] = {}
        self.algorithm.seed = seed
        self.algorithm.clock, self.algorithm.local = self.clock, self.local  # what deadline-aware algorithms plan with
        self.algorithm.setup(self.model, num_clients, self.devices)
        from leantrain.train.tasks import ClassificationTask

        self.loss_fn = ClassificationTask().loss
        self.async_runtime = AsyncRuntime() if getattr(algorithm, "asynchronous", False) else None
        self.next_round = 0
        self.phase_index = 0  # the phase of the round being run (multi-phase algorithms)

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
        """Client ``cid``'s endless batch stream in round ``r`` (seeded with :func:`batch_seed`)."""
        return self.client_data.batches(cid, self.local.batch_size, batch_seed(self.seed, r, cid, self.phase_index))

    def client_context(self, r: int, cid: int, batches) -> ClientContext:
        """What ``client_update`` gets: the working model, the batches, n_i, the local settings, its state and its
        unlabeled batches (if it holds unlabeled rows)."""
        unlabeled = self.client_data.unlabeled_batches(
            cid, self.local.batch_size, seed_for(batch_seed(self.seed, r, cid, self.phase_index), 5)
        )
        return ClientContext(cid, r, self.model, batches, self.client_data.num_samples(cid), self.local,
                             self.loss_fn, self.devices[cid], dict(self.client_states.get(cid, {})),
                             unlabeled)  # fmt: skip

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

    def available(self, r: int) -> list[int]:
        """The clients online in round ``r``: each with probability ``availability`` (seeded with (seed, round))."""
        if self.availability >= 1:
            return list(range(self.num_clients))
        online = np.random.default_rng(seed_for(self.seed, r, 9)).random(self.num_clients) < self.availability
        return [int(c) for c in np.flatnonzero(online)]

    def run_round(self, r: int) -> dict[str, Any]:
        """Round ``r`` (one server update of an asynchronous algorithm), evaluated when due; its record."""
        started = time.perf_counter()
        if self.async_runtime is not None:
            row = self.async_runtime.run_round(self, r, np.random.default_rng(seed_for(self.seed, r)))
        else:
            row = self._synchronous_round(r)
        if (r + 1) % self.eval_every == 0 or r + 1 == self.rounds or self.budget_spent():
            row.update({f"test_{k}": v for k, v in self.evaluate().items()})
        row["wall_s"] = time.perf_counter() - started
        return row

    def _synchronous_round(self, r: int) -> dict[str, Any]:
        """The phases of round ``r``, one after another; the round lasts their durations' sum."""
        available = self.available(r)
        phases = self.algorithm.phases(r)
        row: dict[str, Any] = {"round": r, "cohort": 0, "available": len(available), "events": []}
        losses: list[float] = []
        duration = 0.0
        for p, phase in enumerate(phases):
            self.phase_index = p
            self.algorithm.begin_phase(r, phase)
            rng = np.random.default_rng(seed_for(self.seed, r) if p == 0 else seed_for(self.seed, r, p, 11))
            cohort = self.algorithm.sample(r, self.clients_per_round, rng, available)
            out = self._run_phase(r, cohort)
            duration += out["duration"]
            losses += out["losses"]
            row["cohort"] += len(cohort)
            for k, v in out["counts"].items():
                row[k] = row.get(k, 0) + v
            row["events"] += out["events"]
            if len(phases) > 1:
                row.setdefault("phases", {})[phase] = {"cohort": len(cohort), **out["counts"],
                                                       "round_time_s": out["duration"],
                                                       "train_loss": _mean(out["losses"])}  # fmt: skip
        self.phase_index = 0
        self.clock.now += duration
        row.update({**self.ledger.round_totals(r), "train_loss": _mean(losses), "round_time_s": duration,
                    "sim_time_s": self.clock.now, "engine": self.engine.describe()})  # fmt: skip
        return row

    def _run_phase(self, r: int, cohort: list[int]) -> dict[str, Any]:
        """One sample -> configure -> train -> accumulate -> aggregate cycle; its duration, losses and counts."""
        instructions = self.algorithm.configure(r, cohort)
        deadline = self.algorithm.deadline(r, cohort, instructions)
        intake = RoundIntake(self.algorithm, r, self.guard, self.client_data.num_samples)
        unscheduled = [cid for cid in cohort if cid not in instructions]
        if unscheduled and deadline is None:
            raise ConfigError(f"{self.algorithm.name}: no instruction for sampled clients {unscheduled[:5]}")
        for cid in unscheduled:  # no work fits the deadline: nothing is sent
            intake.late(cid, None, deadline)
        cohort = [cid for cid in cohort if cid in instructions]
        down = {cid: self.ledger.record(r, cid, "down", instructions[cid].arrays, instructions[cid].config)
                for cid in cohort}  # fmt: skip
        up, states, times = {}, {}, {}
        for out in self.engine.train(self, r, cohort, instructions):
            cid = out.cid
            if out.reply is None:
                intake.dropped(cid) if out.why == DROPPED else intake.failed(cid, str(out.why))
                continue
            arrays = out.reply.arrays if isinstance(out.reply, Reply) else {}
            if deadline is not None:
                finish = self.reply_time(cid, out.reply, down[cid], message_nbytes(arrays))
                if finish > deadline * (1 + 1e-9):  # (float rounding of the same sum)
                    intake.late(cid, finish, deadline)
                    continue
            up[cid] = self.ledger.record(r, cid, "up", arrays)
            if intake.offer(cid, instructions[cid], out.reply) is None:
                states[cid] = out.state
        accepted = intake.close()
        losses = []
        for cid, reply in accepted.items():
            if states.get(cid):
                self.client_states[cid] = states[cid]
            else:
                self.client_states.pop(cid, None)
            losses.append(float(reply.metrics.get("loss", float("nan"))))
            times[cid] = self.reply_time(cid, reply, down[cid], up[cid])
        self.algorithm.aggregate(r)
        duration = deadline if deadline is not None else max(times.values(), default=0.0)
        return {"duration": duration, "losses": losses, "counts": intake.counts, "events": intake.events}

    def reply_time(self, cid: int, reply: Reply, down_bytes: int, up_bytes: int) -> float:
        """Simulated seconds from the instruction's download to the reply's upload (compute + transfers)."""
        metrics = reply.metrics if isinstance(reply, Reply) and isinstance(reply.metrics, dict) else {}
        work = float(metrics.get("work", 1.0))
        return self.clock.client_time(self.devices[cid], int(metrics.get("samples", 0)), work, down_bytes, up_bytes, 2)

    def budget_spent(self) -> bool:
        """Whether the simulated-time budget (``time_budget_s``) is used up."""
        return self.time_budget_s is not None and self.clock.now >= self.time_budget_s

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
            stopping = r + 1 == last or self.budget_spent() or (should_stop is not None and should_stop())
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
            "async": self.async_runtime.state_dict() if self.async_runtime is not None else None,
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
        if self.async_runtime is not None:
            self.async_runtime.load_state_dict(state["async"])
        self.next_round = state["next_round"]
        return True
