"""FedBuff (Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba, "Federated Learning with Buffered Asynchronous
Aggregation", AISTATS 2022, arXiv 2106.06639): the asynchronous baseline TimelyFL is measured against.

``concurrency`` clients train at once, each on the model version it downloaded; a finished client sends its update
Δ_i = x_local − x_received and is replaced by a newly sampled one. The server adds ``s(τ_i)·Δ_i`` to a buffer, τ_i
the staleness (server updates since the client's download), ``s(τ) = 1/sqrt(1 + τ)``; after ``buffer_size`` K
updates it applies ``x ← x + server_lr · buffer / K`` and clears the buffer. The simulator runs it on its event
queue (:mod:`leantrain.federated.asynchronous`): one "round" is one server update; the concurrency is the
simulator's ``clients_per_round``.

Choices: the buffer divides by K (the paper's Algorithm 1), so staleness down-weights a stale update rather than
re-normalizing; ``weighting="samples"`` instead divides ``Σ s(τ_i)·n_i·Δ_i`` by ``Σ n_i``. A client contributes at
most once per buffer (it is not re-sampled until the buffer is applied).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from leantrain.errors import ConfigError
from leantrain.federated.algorithms.base import (
    Algorithm,
    ClientContext,
    Instruction,
    Reply,
    WeightedMean,
    communicated,
    load_arrays,
)
from leantrain.federated.client import local_sgd

STALENESS = ("sqrt", "constant")


class FedBuff(Algorithm):
    """Buffered asynchronous aggregation: ``buffer_size`` K, ``server_lr`` η_g, ``staleness`` "sqrt" (1/sqrt(1+τ))
    or "constant" (1)."""

    name = "fedbuff"
    asynchronous = True

    def __init__(self, buffer_size: int = 10, server_lr: float = 1.0, staleness: str = "sqrt",
                 weighting: str = "uniform"):  # fmt: skip
        super().__init__(weighting)
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ConfigError(f"FedBuff buffer_size={buffer_size!r} is invalid; expected an integer >= 1")
        if not isinstance(server_lr, int | float) or isinstance(server_lr, bool) or not server_lr > 0:
            raise ConfigError(f"FedBuff server_lr={server_lr!r} is invalid; expected a number > 0")
        if staleness not in STALENESS:
            raise ConfigError(f"FedBuff staleness={staleness!r} is invalid; accepted: {STALENESS}")
        self.buffer_size, self.server_lr, self.staleness = buffer_size, float(server_lr), staleness
        self.version = 0
        self.dispatched: dict[int, int] = {}  # client id -> model version it downloaded
        self.round_staleness: list[int] = []

    def staleness_weight(self, tau: int) -> float:
        return 1.0 / math.sqrt(1.0 + tau) if self.staleness == "sqrt" else 1.0

    def configure(self, round_idx: int, cohort: list[int]) -> dict[int, Instruction]:
        down = communicated(self.global_state)
        for cid in cohort:
            self.dispatched[cid] = self.version
        return {cid: Instruction(down) for cid in cohort}

    def client_update(self, ctx: ClientContext, instruction: Instruction) -> Reply:
        load_arrays(ctx.model, instruction.arrays)
        metrics = local_sgd(ctx.model, ctx.loss_fn, ctx.batches, ctx.local.steps, ctx.local.lr, ctx.local.momentum,
                            ctx.local.weight_decay)  # fmt: skip
        state = ctx.model.state_dict()
        return Reply({k: state[k].detach() - v for k, v in instruction.arrays.items()}, metrics)

    def expected_upload(self, round_idx: int, cid: int, instruction: Instruction) -> dict[str, tuple]:
        return {k: (tuple(v.shape), v.dtype) for k, v in instruction.arrays.items()}

    def reference(self, name: str) -> torch.Tensor | None:
        """Replies are updates Δ: the reply guard measures them from zero."""
        ref = self.global_state.get(name)
        return None if ref is None else torch.zeros_like(ref)

    def accumulate(self, round_idx: int, cid: int, reply: Reply) -> None:
        tau = self.version - self.dispatched.pop(cid, self.version)
        self.round_staleness.append(tau)
        if getattr(self, "_buffer", None) is None:
            self._buffer, self._count, self._examples = WeightedMean(), 0, 0.0
        w = self.staleness_weight(tau) * self.weight(reply)
        for k, v in reply.arrays.items():
            self._buffer.add(k, v, w)
        self._count += 1
        self._examples += self.weight(reply)

    def aggregate(self, round_idx: int) -> None:
        buffer, self._buffer = getattr(self, "_buffer", None), None
        if buffer is None or not self._count:
            return
        # WeightedMean keeps Σ wΔ and Σ w; FedBuff divides Σ s(τ)Δ by K (uniform) or Σ s(τ) n Δ by Σ n (samples)
        for k in list(self.global_state):
            if k in buffer:
                total = buffer.sums[k] / self._examples
                self.global_state[k] = (self.global_state[k].to(torch.float64) + self.server_lr * total).to(
                    self.global_state[k].dtype
                )
        self.version += 1

    def take_staleness(self) -> list[int]:
        """The staleness of every update folded since the last call (the runtime logs it per round)."""
        out, self.round_staleness = self.round_staleness, []
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "version": self.version, "dispatched": dict(self.dispatched)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.version = int(state["version"])
        self.dispatched = {int(k): int(v) for k, v in state["dispatched"].items()}
