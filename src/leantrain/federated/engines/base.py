"""What an engine produces (one :class:`ClientOutcome` per sampled client) and the engine interface."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from leantrain.federated.algorithms.base import Instruction, Reply

DROPPED = "dropped out"


@dataclass
class ClientOutcome:
    """How one sampled client's round ended: a reply (``why`` None), or no reply and why.

    ``why`` is :data:`DROPPED` for a client that vanished, otherwise the failure ("ValueError: ..."). ``state`` is
    the client's persistent state after its update (stored only if its reply is accepted; empty deletes it).
    """

    cid: int
    reply: Reply | None = None
    why: str | None = None
    state: dict[str, torch.Tensor] | None = None


class Engine:
    """Trains a round's cohort on the simulator's clients; subclasses define :meth:`train`.

    ``sim`` is the :class:`~leantrain.federated.simulator.Simulator` (not imported here: the simulator imports the
    engines).

    ``name`` is what the simulator logs as the engine in use (an automatic engine reports its choice).
    """

    name = "engine"

    def train(self, sim: Any, round_idx: int, cohort: list[int],
              instructions: dict[int, Instruction]) -> Iterator[ClientOutcome]:  # fmt: skip
        raise NotImplementedError

    def describe(self) -> str:
        """One line saying how clients are trained (shown at the start of a run)."""
        return self.name
