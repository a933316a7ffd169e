"""Asynchronous rounds on the simulated clock (algorithms with ``asynchronous = True``, e.g. FedBuff).

The simulator keeps ``clients_per_round`` clients in flight (the concurrency). A client is dispatched at the current
simulated time: it gets the current global model (``algorithm.configure(round, [cid])``) and is trained at once on
the working model, and its reply is scheduled on the clock's :class:`~leantrain.federated.clock.EventQueue` at
``now + its compute and transfer time``. The runtime pops replies in time order, advancing the clock to each, and
offers them to the round's intake (the same checks and guards as a synchronous round); once ``buffer_size`` replies
arrived, the round closes: they are folded in client-id order and ``algorithm.aggregate`` applies the buffer. A
"round" is thus one server update. Training at dispatch time gives exactly what training during the flight would:
the client's work depends only on the model it downloaded.

Choices: a client that drops out or fails frees its slot at once (a real server would notice only at a timeout); a
client contributes at most once per buffer; a client's batches are seeded with (seed, dispatch number, client), the
dispatch number counting every dispatch of the run. In-flight replies are part of the checkpoint, so a resumed run
continues the same event sequence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from leantrain.federated.algorithms.base import Instruction, Reply
from leantrain.federated.clock import EventQueue
from leantrain.federated.comm import message_nbytes
from leantrain.federated.engines import DROPPED
from leantrain.federated.intake import RoundIntake


class AsyncRuntime:
    """The in-flight clients of an asynchronous run and the dispatch counter (checkpointed with the simulator)."""

    def __init__(self) -> None:
        self.queue = EventQueue()
        self.dispatches = 0

    def in_flight(self) -> set[int]:
        return {e["cid"] for e in self.queue.events()}

    def dispatch(self, sim: Any, r: int, cid: int, intake: RoundIntake) -> None:
        """Send client ``cid`` the current model and schedule its reply (or count its dropout or failure)."""
        instruction = sim.algorithm.configure(r, [cid])[cid]
        down = sim.ledger.record(r, cid, "down", instruction.arrays, instruction.config)
        serial = self.dispatches
        self.dispatches += 1
        out = sim.train_one(serial, cid, instruction)
        if out.reply is None:
            intake.dropped(cid) if out.why == DROPPED else intake.failed(cid, str(out.why))
            sim.algorithm.dispatched.pop(cid, None)
            return
        reply = out.reply
        arrays = reply.arrays if isinstance(reply, Reply) else {}
        arrives = sim.clock.now + sim.reply_time(cid, reply, down, message_nbytes(arrays))
        metrics = dict(reply.metrics) if isinstance(reply, Reply) else {}
        self.queue.push(arrives, {"cid": cid, "round": r, "arrays": dict(arrays), "metrics": metrics,
                                  "config": dict(instruction.config), "sent": instruction.arrays})  # fmt: skip

    def run_round(self, sim: Any, r: int, rng: np.random.Generator) -> dict[str, Any]:
        """One server update: dispatch (sampling with ``rng``), receive ``buffer_size`` replies in time order,
        aggregate. The round's record, without evaluation."""
        begun = sim.clock.now
        algorithm = sim.algorithm
        intake = RoundIntake(algorithm, r, sim.guard, sim.client_data.num_samples)
        available = sim.available(r)
        arrived: set[int] = set()
        dispatched = 0
        while len(arrived) < algorithm.buffer_size:
            busy = self.in_flight() | arrived
            idle = [c for c in available if c not in busy]
            slots = sim.clients_per_round - len(self.queue)
            if slots > 0 and idle:
                for cid in sorted(int(c) for c in rng.choice(idle, size=min(slots, len(idle)), replace=False)):
                    self.dispatch(sim, r, cid, intake)
                    dispatched += 1
            if not len(self.queue):
                break  # nobody left to train (all failed or unavailable)
            when, event = self.queue.pop()
            sim.clock.now = max(sim.clock.now, when)
            reply = Reply(event["arrays"], event["metrics"])
            sim.ledger.record(r, event["cid"], "up", reply.arrays)
            arrived.add(event["cid"])
            intake.offer(event["cid"], Instruction(event["sent"], event["config"]), reply)
        accepted = intake.close()
        algorithm.aggregate(r)
        staleness = algorithm.take_staleness() if hasattr(algorithm, "take_staleness") else []
        losses = [float(rep.metrics.get("loss", float("nan"))) for rep in accepted.values()]
        row = {"round": r, "cohort": dispatched, "available": len(available), **intake.counts,
               "events": intake.events, **sim.ledger.round_totals(r),
               "train_loss": float(np.nanmean(losses)) if losses else None, "round_time_s": sim.clock.now - begun,
               "sim_time_s": sim.clock.now, "engine": "asynchronous",
               "staleness_mean": float(np.mean(staleness)) if staleness else None,
               "staleness_max": int(max(staleness)) if staleness else None}  # fmt: skip
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"queue": self.queue.state_dict(), "dispatches": self.dispatches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queue.load_state_dict(state["queue"])
        self.dispatches = int(state["dispatches"])
