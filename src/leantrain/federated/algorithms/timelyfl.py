"""TimelyFL (Zhang, Gao, Lee, Zhang, Avestimehr, "TimelyFL: Heterogeneity-aware Asynchronous Federated Learning
with Adaptive Partial Training", CVPR-W FedVision 2023, arXiv 2304.06947).

Stragglers in cross-device FL either stall synchronous rounds or, in buffered asynchronous FL (FedBuff), return
stale updates while fast clients dominate. TimelyFL keeps a wall-clock aggregation interval T and shrinks each slow
client's workload so that every participating client returns a *fresh* update within T: more local work for fast
clients, fewer local epochs or training only the output-side part of the model for slow ones.

No official code exists (project spec, federated §6: not in FedML or the authors' public repositories), so this is
derived from the paper's description; every interpretation is listed below and in docs/timelyfl.md.

Each round (the simulator's :meth:`~leantrain.federated.simulator.Simulator.available` clients, of which
``clients_per_round`` are sampled: the concurrency C):

1. Each sampled client's unit time ``t_i = t_i^cmp + t_i^com`` is read from its profile: ``t_i^cmp`` the compute
   time of one unit of local training (τ local SGD steps of the full model), ``t_i^com`` the time to download and
   upload the full model. The simulated clock's own model gives both (:class:`~leantrain.federated.clock.
   SimulatedClock`), so the plan is exact: the server knows the clients' real-time profiles, as the paper assumes.
2. The aggregation interval T is the k-th smallest t_i in the cohort (``aggregation_target`` k; default half of the
   cohort), sent with the model.
3. A client with ``t_i <= T`` trains the full model for ``E_i = min(E_max, floor((T - t_i^com) / t_i^cmp))`` units
   (``max_units`` E_max, default 2). A slower client trains only the output-side suffix of the model's blocks
   (:mod:`leantrain.federated.blocks`, as EmbracingFL) for one unit: the longest suffix whose cost (the frozen
   prefix's forward, the suffix's forward and backward, the full download and the suffix's upload) fits T. If even
   the last block does not fit one unit, it trains the last block for the largest number of steps that fits. A
   client for whom not one step fits gets no instruction (the runtime counts it late; nothing is sent).
4. The server closes the round at T (:meth:`deadline`): every planned client has replied by construction; it
   averages each tensor over the clients that trained it (FedAvg weighting) and keeps the rest.

``adaptive=False`` gives the paper's synchronous baseline under the same interval: FedAvg with deadline T, where
every client trains one full unit and those who would finish after T are dropped (late).

Interpretations (the paper's formulas could not be checked against its full text here):

- **Unit of work** = τ local steps (the simulator's local round), not a local epoch over the client's data: our
  clients' datasets differ in size by orders of magnitude at Dirichlet 0.1, and a round's work is set in steps in
  every other algorithm here.
- **k** (which quantile of t_i sets T) defaults to half the cohort, the FedBuff-style buffer of the spec's plan
  (C = 20, k = 10).
- **Partial-training cost**: ``t^cmp · work(cut) + full download + suffix upload``, with ``work(cut) =
  (F + 2·F_suffix) / 3F`` measured in multiply-accumulates (the spec's cost model with a forward share of 1/3).
- **Weighting**: per tensor over its contributors, by the clients' dataset sizes (``weighting="samples"``) or
  uniformly; the paper's weighting for partial updates is not known here.
- The profile is re-read every round, so a client can train fully in one round and partially in the next (the
  paper's "real-time" profiling); in the simulator profiles are fixed per client, availability varies per round.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from leantrain.errors import ConfigError
from leantrain.federated.algorithms.base import (
    Algorithm,
    ClientContext,
    Instruction,
    Reply,
    communicated,
    load_arrays,
)
from leantrain.federated.blocks import ordered_blocks, suffix_tensors, suffix_work, train_suffix
from leantrain.federated.comm import message_nbytes


class TimelyFL(Algorithm):
    """Deadline-aware rounds with per-client workloads (``adaptive=True``) or deadline FedAvg (``adaptive=False``).

    ``aggregation_target`` k (None: half the cohort, at least 1), ``max_units`` E_max, ``input_shape`` for the block
    probe when the model does not say, ``weighting`` as in FedAvg.
    """

    name = "timelyfl"

    def __init__(self, aggregation_target: int | None = None, max_units: int = 2, adaptive: bool = True,
                 input_shape: tuple[int, ...] | list[int] | None = None, weighting: str = "samples"):  # fmt: skip
        super().__init__(weighting)
        for name, value in (("aggregation_target", aggregation_target), ("max_units", max_units)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"TimelyFL {name}={value!r} is invalid; expected an integer >= 1")
        if not isinstance(adaptive, bool):
            raise ConfigError(f"TimelyFL adaptive={adaptive!r} is invalid; expected true or false")
        self.aggregation_target, self.max_units, self.adaptive = aggregation_target, max_units, adaptive
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self._deadline: float | None = None
        self.plans: dict[int, dict[str, Any]] = {}

    def setup(self, model: nn.Module, num_clients: int, devices: list) -> None:
        super().setup(model, num_clients, devices)
        self.blocks = ordered_blocks(model, self.input_shape)
        if getattr(self, "clock", None) is None or getattr(self, "local", None) is None:
            raise ConfigError("TimelyFL plans with the simulated clock: run it in leantrain's Simulator")

    # -------------------------------------------------------------- the plan

    def suffix(self, cut: int) -> list[str]:
        """The communicated tensors of blocks ``cut``.. (what a client with that cut trains and uploads)."""
        return suffix_tensors(self.blocks, cut, communicated(self.global_state))

    def _time(self, cid: int, steps: int, cut: int, config: dict[str, Any]) -> float:
        down = communicated(self.global_state)
        up = {k: down[k] for k in self.suffix(cut)}
        samples = steps * self.local.batch_size
        return self.clock.client_time(self.devices[cid], samples, suffix_work(self.blocks, cut),
                                      message_nbytes(down, config), message_nbytes(up), 2)  # fmt: skip

    @staticmethod
    def _config(steps: int, cut: int, tau: int) -> dict[str, Any]:
        return {**({"steps": steps} if steps != tau else {}), **({"cut": cut} if cut else {})}

    def unit_time(self, cid: int) -> float:
        """t_i: one unit (τ steps) of full-model training plus the full model's transfers."""
        return self._time(cid, self.local.steps, 0, {})

    def plan(self, cid: int, deadline: float) -> dict[str, Any] | None:
        """The largest workload of client ``cid`` that ends by ``deadline`` ({"steps", "cut"}), or None."""
        tau = self.local.steps

        def fits(steps: int, cut: int) -> bool:
            return self._time(cid, steps, cut, self._config(steps, cut, tau)) <= deadline

        for units in range(self.max_units, 0, -1):  # full model, E_i units
            if fits(units * tau, 0):
                return {"steps": units * tau, "cut": 0}
        for cut in range(1, len(self.blocks)):  # one unit of the longest suffix that fits
            if fits(tau, cut):
                return {"steps": tau, "cut": cut}
        last = len(self.blocks) - 1
        for steps in range(tau - 1, 0, -1):  # a fraction of a unit on the last block
            if fits(steps, last):
                return {"steps": steps, "cut": last}
        return None

    # -------------------------------------------------------------- one round

    def configure(self, round_idx: int, cohort: list[int]) -> dict[int, Instruction]:
        down = communicated(self.global_state)
        times = sorted(self.unit_time(cid) for cid in cohort)
        k = self.aggregation_target or max(1, len(cohort) // 2)
        self._deadline = times[min(k, len(times)) - 1] if times else None
        self.plans = {}
        instructions = {}
        for cid in cohort:
            plan = self.plan(cid, self._deadline) if self.adaptive else {"steps": self.local.steps, "cut": 0}
            self.plans[cid] = plan
            if plan is not None:  # else not one step fits: the client is not scheduled (the runtime counts it late)
                instructions[cid] = Instruction(down, self._config(plan["steps"], plan["cut"], self.local.steps))
        return instructions

    def deadline(self, round_idx: int, cohort: list[int], instructions: dict[int, Instruction]) -> float | None:
        return self._deadline

    def client_update(self, ctx: ClientContext, instruction: Instruction) -> Reply:
        load_arrays(ctx.model, instruction.arrays)
        cut = int(instruction.config.get("cut", 0))
        steps = int(instruction.config.get("steps", ctx.local.steps))
        metrics = train_suffix(ctx, self.blocks, cut, steps)
        state = ctx.model.state_dict()
        metrics = {**metrics, "work": suffix_work(self.blocks, cut)}
        return Reply({k: state[k].detach().clone() for k in self.suffix(cut)}, metrics)

    def expected_upload(self, round_idx: int, cid: int, instruction: Instruction) -> dict[str, tuple]:
        cut = int(instruction.config.get("cut", 0))
        return {k: (tuple(self.global_state[k].shape), self.global_state[k].dtype) for k in self.suffix(cut)}
