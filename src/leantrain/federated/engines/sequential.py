"""The reference engine: the cohort's clients trained one after another on the simulator's one working model
(FedML Parrot's sequential training; memory does not grow with the cohort)."""

from __future__ import annotations

from collections.abc import Iterator

from leantrain.federated.engines.base import ClientOutcome, Engine


class SequentialEngine(Engine):
    """Each client in turn through :meth:`Simulator.train_one` (every algorithm, every model)."""

    name = "sequential"

    def train(self, sim, round_idx, cohort, instructions) -> Iterator[ClientOutcome]:
        for cid in cohort:
            yield sim.train_one(round_idx, cid, instructions[cid])
