"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS
2017, arXiv 1602.05629): every sampled client trains the full model for τ local SGD steps from the global model
and sends it back; the server averages (weighted by samples, or uniformly).

The baseline every other algorithm here is measured against. Sent down: every floating-point tensor of the global
model; sent up: the same set (the new local values; an update Δ would cost the same bytes).
"""

from __future__ import annotations

from leantrain.federated.algorithms.base import (
    Algorithm,
    ClientContext,
    Instruction,
    Reply,
    communicated,
    load_arrays,
)
from leantrain.federated.client import local_sgd


class FedAvg(Algorithm):
    """Federated averaging of the full model."""

    name = "fedavg"
    trains_full_model = True  # client_update is exactly load + local_sgd + reply the values (engines may vectorise)

    def configure(self, round_idx: int, cohort: list[int]) -> dict[int, Instruction]:
        down = communicated(self.global_state)
        return {cid: Instruction(down) for cid in cohort}

    def client_update(self, ctx: ClientContext, instruction: Instruction) -> Reply:
        load_arrays(ctx.model, instruction.arrays)
        metrics = local_sgd(ctx.model, ctx.loss_fn, ctx.batches, ctx.local.steps, ctx.local.lr,
                            ctx.local.momentum, ctx.local.weight_decay)  # fmt: skip
        state = ctx.model.state_dict()
        return Reply({k: state[k].detach().clone() for k in instruction.arrays}, metrics)

    def expected_upload(self, round_idx: int, cid: int, instruction: Instruction) -> dict[str, tuple]:
        return {k: (tuple(v.shape), v.dtype) for k, v in instruction.arrays.items()}
