"""A Flower Message-API Strategy that runs one of our federated algorithms, round for round as the simulator does.

``configure_train`` draws the round's cohort with the simulator's generator (seeded with ``(seed, round)``), asks
``algorithm.configure`` for the instructions and sends one Message per sampled client to the node that holds its
partition. ``aggregate_train`` validates every reply with the simulator's :func:`check_reply` against
``algorithm.expected_upload``, feeds the accepted ones to ``algorithm.accumulate`` in client-id order (the
simulator's order) and calls ``algorithm.aggregate``. A :class:`~leantrain.federated.comm.ByteLedger` records
every instruction and reply exactly as the simulator's ledger does, so the two can be compared entry by entry.

Flower's rounds start at 1, ours at 0: Flower round ``t`` is our round ``t - 1``. Node ids are mapped to client
ids through each node's ``partition-id`` (asked once with a ``query`` message before the first round). The
algorithm owns the global model: the ``arrays`` Flower passes to ``configure_train`` are ignored, and the arrays
returned by ``aggregate_train`` (hence ``Result.arrays``) are ``algorithm.eval_state()``. Server-side evaluation
uses the same test rows and batch size as ``Simulator.evaluate``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log
from torch import nn

from leantrain.errors import ConfigError, LeantrainError
from leantrain.federated.algorithms.base import Algorithm, Instruction, Reply
from leantrain.federated.clock import assign_profiles, profile
from leantrain.federated.comm import ByteLedger
from leantrain.federated.flower.client_app import PARTITION
from leantrain.federated.flower.config import FlowerRunConfig, initial_model
from leantrain.federated.flower.records import (
    ALGORITHM_CONFIG,
    ARRAYS,
    CONFIG,
    RECEIVED_BYTES,
    SENT_BYTES,
    MalformedMessageError,
    from_array_record,
    instruction_config,
    read_reply,
    record_nbytes,
    to_array_record,
)
from leantrain.federated.intake import OUTCOMES, ReplyGuard, RoundIntake
from leantrain.federated.simulator import evaluate_state, seed_for

_TRANSPORT_METRICS = ("num-examples", SENT_BYTES, RECEIVED_BYTES)


def simulator_only(algorithm: Algorithm) -> str | None:
    """Why ``algorithm`` cannot run as this one-phase synchronous Strategy (None: it can).

    Deadlines (TimelyFL) and asynchronous aggregation (FedBuff) need the simulated clock, which Flower lacks
    (project spec, federated §11). Rounds of several phases (on-device KD) run: one exchange per phase."""
    if getattr(algorithm, "asynchronous", False):
        return "asynchronous aggregation needs the simulator's event queue (Flower has no asynchronous strategy)"
    if type(algorithm).deadline is not Algorithm.deadline:
        return "its round deadline is planned on the simulated clock (Flower has no virtual clock)"
    return None


class LeantrainStrategy(Strategy):
    """Drive ``algorithm`` over Flower nodes: ``clients_per_round`` of ``num_clients`` partitions per round.

    ``model`` is the initial global model (build it under ``torch.manual_seed(seed)`` to match the simulator; see
    :meth:`from_config`). ``test_data`` (``{"x", "labels"}``) enables server-side evaluation after every round.
    ``node_wait_s`` bounds how long :meth:`start` waits for the nodes of all partitions to connect. ``guard`` and
    ``known_examples(cid)`` (a client's dataset size as the server knows it, or None) work as in the simulator's
    :class:`~leantrain.federated.intake.RoundIntake`: replies are checked, guarded and folded in client-id order.
    """

    def __init__(self, algorithm: Algorithm, model: nn.Module, num_clients: int, clients_per_round: int,
                 seed: int = 0, *, devices: dict[str, float] | None = None,
                 test_data: dict[str, torch.Tensor] | None = None, eval_batch_size: int = 1000,
                 node_wait_s: float = 120.0, guard: ReplyGuard | None = None,
                 known_examples: Callable[[int], int | None] | None = None):  # fmt: skip
        if not isinstance(algorithm, Algorithm):
            raise ConfigError(f"algorithm={algorithm!r} is not a leantrain federated Algorithm")
        if not 1 <= clients_per_round <= num_clients:
            raise ConfigError(f"clients_per_round={clients_per_round} must be in [1, num_clients={num_clients}]")
        self.algorithm, self.model = algorithm, model
        self.num_clients, self.clients_per_round, self.seed = num_clients, clients_per_round, seed
        self.test_data, self.eval_batch_size, self.node_wait_s = test_data, eval_batch_size, node_wait_s
        self.guard, self.known_examples = guard, known_examples
        why = simulator_only(algorithm)
        if why:
            raise ConfigError(f"{algorithm.name} does not run on Flower: {why}; run it in leantrain's Simulator")
        self.devices = [profile(n) for n in assign_profiles(num_clients, devices, seed)]
        self.algorithm.seed = seed
        self.algorithm.setup(model, num_clients, self.devices)
        self.ledger = ByteLedger()
        self.rounds: list[dict[str, Any]] = []  # one history row per round (the simulator's row keys)
        self.initial_eval: dict[str, float] | None = None
        self.cid_to_node: dict[int, int] = {}
        self._sent: dict[int, tuple[int, Instruction]] = {}  # node id -> (cid, instruction) of this round
        self._cohort: list[int] = []
        self._round_started = time.perf_counter()  # reset by configure_train; rows' wall_s count from there
        self._phase_rows: list[dict[str, Any]] = []  # this round's folded phases
        self._timeout = 3600.0  # start() sets Flower's round timeout

    @classmethod
    def from_config(
        cls, config: FlowerRunConfig, model_fn: Callable[[], nn.Module] | None = None
    ) -> LeantrainStrategy:
        """The strategy for ``config``: the same algorithm, initial model, devices and test rows as its Simulator."""
        data = config.data()
        model = initial_model(model_fn or config.model_fn(data), config.seed)
        return cls(config.algorithm_instance(), model, config.num_clients, config.clients_per_round, config.seed,
                   devices=config.devices or None, test_data=data.test, eval_batch_size=config.eval_batch_size,
                   node_wait_s=config.node_wait_s, known_examples=lambda cid: len(data.parts[cid]))  # fmt: skip

    def summary(self) -> None:
        log(INFO, "\t├──> leantrain algorithm: %s (%s)", self.algorithm.name, type(self.algorithm).__name__)
        log(INFO, "\t└──> clients: %d per round of %d, seed %d", self.clients_per_round, self.num_clients, self.seed)

    # ------------------------------------------------------------------ nodes -> client ids

    def connect(self, grid: Grid, timeout: float = 60.0) -> dict[int, int]:
        """Wait for the nodes and ask each new one its ``partition-id``; returns client id -> node id."""
        deadline = time.monotonic() + self.node_wait_s
        while True:
            known = set(self.cid_to_node.values())
            new = [n for n in sorted(grid.get_node_ids()) if n not in known]
            if new:
                queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
                for reply in grid.send_and_receive(queries, timeout=timeout):
                    self._register(reply)
            if len(self.cid_to_node) == self.num_clients:
                return self.cid_to_node
            if time.monotonic() > deadline:
                if not self.cid_to_node:
                    raise LeantrainError(f"no SuperNode with a partition-id connected within {self.node_wait_s:.0f} s")
                missing = sorted(set(range(self.num_clients)) - set(self.cid_to_node))
                log(
                    WARNING,
                    "clients %s have no node after %.0f s; sampling from the others",
                    missing,
                    self.node_wait_s,
                )
                return self.cid_to_node
            time.sleep(0.5)

    def _register(self, reply: Message) -> None:
        node = reply.metadata.src_node_id
        if reply.has_error() or PARTITION not in reply.content.metric_records:
            log(WARNING, "node %d did not report a partition-id: %s", node,
                reply.error.reason if reply.has_error() else "no partition record")  # fmt: skip
            return
        cid = int(reply.content.metric_records[PARTITION]["partition-id"])
        if not 0 <= cid < self.num_clients:
            raise ConfigError(f"node {node} holds partition-id={cid}, outside num_clients={self.num_clients}")
        if cid in self.cid_to_node and self.cid_to_node[cid] != node:
            raise ConfigError(f"nodes {self.cid_to_node[cid]} and {node} both hold partition-id={cid}")
        self.cid_to_node[cid] = node

    # ------------------------------------------------------------------ one round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:  # fmt: skip
        """The round's messages. A round of several phases (on-device KD) runs every phase but the last here, each
        as one ``grid.send_and_receive`` exchange folded and aggregated before the next; the last phase's replies
        come to :meth:`aggregate_train` as usual."""
        r = server_round - 1
        self._round_started = time.perf_counter()
        self._phase_rows = []
        self._flower = {"down_bytes": 0, "up_bytes": 0, "client_sent_bytes": 0, "client_received_bytes": 0}
        phases = tuple(self.algorithm.phases(r))
        for p, phase in enumerate(phases):
            messages = self._configure_phase(r, p, phase, server_round)
            if p == len(phases) - 1:
                return messages
            self._fold_phase(r, phase, grid.send_and_receive(messages, timeout=self._timeout))
        return []

    def _configure_phase(self, r: int, p: int, phase: str, server_round: int) -> list[Message]:
        self.algorithm.begin_phase(r, phase)
        available = sorted(self.cid_to_node)
        rng = np.random.default_rng(seed_for(self.seed, r) if p == 0 else seed_for(self.seed, r, p, 11))
        self._cohort = self.algorithm.sample(r, self.clients_per_round, rng, available)
        instructions = self.algorithm.configure(r, self._cohort)
        self._sent, messages = {}, []
        for cid in self._cohort:
            ins = instructions[cid]
            self.ledger.record(r, cid, "down", ins.arrays, ins.config)
            record, config_record = to_array_record(ins.arrays), instruction_config(r, cid, ins)
            self._flower["down_bytes"] += record_nbytes(record) + len(config_record[ALGORITHM_CONFIG])
            node = self.cid_to_node[cid]
            self._sent[node] = (cid, ins)
            content = RecordDict({ARRAYS: record, CONFIG: config_record})
            messages.append(Message(content, node, MessageType.TRAIN, group_id=str(server_round)))
        return messages

    def _fold_phase(self, r: int, phase: str, replies: Iterable[Message]) -> None:
        """Check, guard and fold one phase's replies (in client-id order), then aggregate."""
        intake = RoundIntake(self.algorithm, r, self.guard, self.known_examples)
        events: list[str] = []
        received: dict[int, Reply | tuple[str, str]] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in self._sent:
                events.append(f"reply from node {node}, which was not sampled, ignored")
                continue
            cid = self._sent[node][0]
            if msg.has_error():
                received[cid] = ("failed", msg.error.reason)
                continue
            self._flower["up_bytes"] += sum(record_nbytes(a) for a in msg.content.array_records.values())
            try:
                received[cid] = read_reply(msg.content)
            except MalformedMessageError as err:
                received[cid] = ("rejected", str(err))
        for cid in self._cohort:  # sorted: the simulator's order
            if cid not in received:
                intake.dropped(cid, "dropped out (no reply)")
                continue
            reply = received[cid]
            if isinstance(reply, tuple):
                if reply[0] == "rejected":
                    intake.rejected(cid, reply[1])
                    self.ledger.record(r, cid, "up", {})  # as the simulator counts a reply that is not a Reply
                else:
                    intake.failed(cid, reply[1])
                continue
            self._flower["client_sent_bytes"] += int(reply.metrics.get(SENT_BYTES, 0))
            self._flower["client_received_bytes"] += int(reply.metrics.get(RECEIVED_BYTES, 0))
            reply = Reply(reply.arrays, {k: v for k, v in reply.metrics.items() if k not in _TRANSPORT_METRICS})
            self.ledger.record(r, cid, "up", reply.arrays)
            intake.offer(cid, next(i for c, i in self._sent.values() if c == cid), reply)
        accepted = intake.close()
        losses = [float(reply.metrics.get("loss", float("nan"))) for reply in accepted.values()]
        self.algorithm.aggregate(r)
        self._phase_rows.append({"phase": phase, "cohort": len(self._cohort), **intake.counts, "losses": losses,
                                 "events": events + intake.events})  # fmt: skip

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:  # fmt: skip
        r = server_round - 1
        self._fold_phase(r, self.algorithm.phase, replies)
        phases, losses = self._phase_rows, [x for p in self._phase_rows for x in p["losses"]]
        counts = {k: sum(p[k] for p in phases) for k in OUTCOMES}
        row = {"round": r, "cohort": sum(p["cohort"] for p in phases), **counts, **self.ledger.round_totals(r),
               "train_loss": float(np.nanmean(losses)) if losses else None,
               "events": [e for p in phases for e in p["events"]], "flower": dict(self._flower),
               "wall_s": time.perf_counter() - self._round_started}  # fmt: skip
        if len(phases) > 1:  # as the simulator's rows (without its simulated durations)
            row["phases"] = {p["phase"]: {"cohort": p["cohort"], **{k: p[k] for k in OUTCOMES},
                                          "train_loss": float(np.nanmean(p["losses"])) if p["losses"] else None}
                             for p in phases}  # fmt: skip
        self.rounds.append(row)
        metrics = {k: float(row[k]) for k in ("responded", "up_bytes", "down_bytes")}
        if row["train_loss"] is not None:
            metrics["train_loss"] = row["train_loss"]
        return to_array_record(self.algorithm.eval_state()), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:  # fmt: skip
        return []  # evaluation is server-side (evaluate_fn), on the simulator's test rows

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # ------------------------------------------------------------------ evaluation and the run

    @torch.no_grad()
    def evaluate(self, server_round: int, arrays: ArrayRecord | None = None) -> MetricRecord | None:
        """Loss and accuracy of ``algorithm.eval_state()`` on the test rows (as ``Simulator.evaluate``)."""
        if self.test_data is None:
            return None
        started = time.perf_counter()
        result = evaluate_state(self.model, self.algorithm.eval_state(), self.test_data, self.eval_batch_size)
        if server_round == 0:
            self.initial_eval = result
        elif self.rounds and self.rounds[-1]["round"] == server_round - 1:
            self.rounds[-1].update({f"test_{k}": v for k, v in result.items()})
            self.rounds[-1]["wall_s"] += time.perf_counter() - started  # as the simulator's rows: with evaluation
        return MetricRecord(result)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:  # fmt: skip
        """Map nodes to clients, then Flower's round loop. ``initial_arrays`` (optional) replaces global tensors."""
        self._timeout = timeout  # each exchange of a multi-phase round's earlier phases waits this long
        self.connect(grid, timeout=min(timeout, 60.0))
        if initial_arrays is not None:
            given = from_array_record(initial_arrays)
            unknown = sorted(set(given) - set(self.algorithm.global_state))
            if unknown:
                raise ConfigError(f"initial_arrays has tensors {unknown[:5]} that the model lacks")
            self.algorithm.global_state.update(
                {k: v.to(self.algorithm.global_state[k].dtype) for k, v in given.items()}
            )
        evaluate_fn = evaluate_fn or (self.evaluate if self.test_data is not None else None)
        return super().start(grid, to_array_record(self.algorithm.global_state), num_rounds, timeout, train_config,
                             evaluate_config, evaluate_fn)  # fmt: skip

    def history(self) -> dict[str, Any]:
        """The run as JSON-able data: per-round rows, totals, the ledger, the node map and the initial evaluation."""
        final = next((row["test_accuracy"] for row in reversed(self.rounds) if "test_accuracy" in row), None)
        return {
            "algorithm": self.algorithm.name,
            "rounds": self.rounds,
            "totals": {**self.ledger.totals(), "final_test_accuracy": final},
            "initial_eval": self.initial_eval,
            "ledger": self.ledger.state_dict(),
            "clients_to_nodes": {str(c): n for c, n in sorted(self.cid_to_node.items())},
        }
