"""Partial model averaging (Lee, Sahu, He, Avestimehr, "Partial Model Averaging in Federated Learning: Performance
Guarantees and Benefits", arXiv 2201.03789, Neurocomputing 2023).

Periodic full averaging (FedAvg with τ local steps) lets the local models drift apart for τ steps and then pulls
them together at once. Partial averaging sends the same bytes, spread out: the model is split into τ disjoint
groups G_0 … G_{τ-1} of roughly equal size; after every local SGD step k, only group G_{k mod τ} is averaged
across the workers. Every parameter is still averaged exactly once per τ steps, but the phases are staggered, so
at any moment most of the model was synchronized fewer than τ steps ago and the local models stay closer
(the paper's smaller model-discrepancy term; project spec, federated §3).

Mapping onto the simulator: one round is one local SGD step (``local_steps`` must be 1). Round r averages group
``r mod τ``: each client of the cohort uploads only that group, and the server averages it over the clients that
replied. The cohort is drawn at rounds r ≡ 0 (mod τ) and kept for the τ rounds of the block (the spec's pitfall:
a group averaged over a changing cohort mixes stale and fresh locals). Clients keep their local model (and
momentum buffers) in ``ctx.state``. A client that replied in the previous round continues from its own local
model and downloads only the group averaged in that round; any other client (a newcomer, or one that dropped
out or was rejected) downloads the server's full copy and starts afresh. Under full participation that makes
the bytes of every τ rounds exactly FedAvg(τ)'s (each tensor once down and once up per client, same wire
headers) with τ times the messages; only round 0 carries the initial full model on top.

State layout (``Simulator.client_states[cid]``, e.g. for the benchmark's discrepancy D = mean_i ‖x_i − x̄‖²):
``"round"`` (the round of the last accepted step), ``"local.<name>"`` (every entry of the local model's state
dict after that step, before that round's averaging) and ``"momentum.<param>"`` (SGD momentum buffers).

Deliberate departures and choices:

- **Groups.** Contiguous groups of whole tensors in forward (state-dict) order, balanced by element count
  (our default from the spec; the paper's rule is not confirmed). The split minimizes the largest group exactly,
  then the spread of the others (dynamic programming), so max group ≤ total/τ + largest tensor. Tensors are never
  split, so one big tensor (e.g. the CNN's first FC weight) makes the groups unequal; :attr:`imbalance`
  (largest group / mean group) reports it. Floating buffers (BatchNorm running statistics) travel in the
  group of the tensor before them, i.e. with their norm layer (the spec's pitfall), and count towards balance.
  Integer buffers never travel.
- **Partial participation.** The paper is "local SGD with many workers"; full participation
  (``clients_per_round == num_clients``) is its setting and is reproduced exactly. With re-sampled cohorts,
  the local progress a departing client made after a group's last averaging is lost (newcomers start from the
  server's copy); no byte budget equal to FedAvg's can carry it. Expect slower learning of the early groups
  there.
- **Momentum.** Buffers are never averaged (spec assumption); each client's buffers persist while it keeps
  replying (the paper's workers keep their optimizer) and restart from zero on a full re-sync. Hence
  ``groups=1`` equals FedAvg with ``local_steps=1`` exactly only with ``momentum=0`` (FedAvg restarts the
  optimizer every round); without momentum the two are identical (tested).
- **Evaluation.** :meth:`eval_state` is the server's copy: every group as last averaged (groups averaged at
  different steps, up to τ−1 steps apart). The clients' current local models are not averaged for it (that
  would cost an extra full upload).
- **Weights** follow FedAvg (``weighting="samples"``: samples processed in the step; ``"uniform"``: 1).
- **Memory.** Every client that has replied keeps one model copy in the simulator's client state until it runs
  again (an algorithm sees a client's state only then); with partial participation that grows to
  ``num_clients`` copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from leantrain.errors import ConfigError, LeantrainError
from leantrain.federated.algorithms.base import (
    Algorithm,
    ClientContext,
    Instruction,
    Reply,
    communicated,
    load_arrays,
)
from leantrain.federated.client import local_sgd
from leantrain.federated.clock import DeviceProfile

DEFAULT_GROUPS = 8  # the spec's CPU check (§3.5); the paper's τ is around 6-24 [M]


def balanced_groups(names: list[str], sizes: list[int], k: int) -> list[list[str]]:
    """Split ``names`` (in order) into ``k`` non-empty contiguous groups: the largest group as small as possible,
    then the squared deviations from the mean group size as small as possible (exact, by dynamic programming).
    """
    n = len(names)
    if not 1 <= k <= n:
        raise ConfigError(f"cannot split {n} tensors into {k} non-empty groups")
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)

    def fits(cap: int) -> bool:  # greedy packing: fewest groups with every group <= cap
        count, total = 1, 0
        for size in sizes:
            if total + size > cap:
                count, total = count + 1, 0
            total += size
        return count <= k  # fewer groups can always be split further (n >= k) without exceeding cap

    low, high = max(sizes), prefix[-1]
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    mean = prefix[-1] / k
    # cost[j][i]: least Σ (size - mean)² splitting the first i units into j groups of size <= low
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for m in range(i - 1, j - 2, -1):  # the last group is units m..i-1
                size = prefix[i] - prefix[m]
                if size > low:
                    break
                c = cost[j - 1][m] + (size - mean) ** 2
                if c < cost[j][i]:
                    cost[j][i], cut[j][i] = c, m
    bounds, i = [], n
    for j in range(k, 0, -1):
        bounds.append((cut[j][i], i))
        i = cut[j][i]
    return [names[a:b] for a, b in reversed(bounds)]


def _tensor_units(state: dict[str, torch.Tensor], model: nn.Module) -> list[list[str]]:
    """Communicated tensors as partition units: each parameter, with the floating buffers after it glued on."""
    params = {n for n, _ in model.named_parameters()}
    units: list[list[str]] = []
    pending: list[str] = []  # buffers before the first parameter join the first unit
    for name in communicated(state):
        if name in params:
            units.append(pending + [name])
            pending = []
        elif units:
            units[-1].append(name)
        else:
            pending.append(name)
    if pending:  # a model with buffers only
        units.append(pending)
    return units


class PartialAveraging(Algorithm):
    """Partial model averaging: one local SGD step per round, group ``round mod τ`` averaged every round.

    ``groups`` is τ (the number of groups and the period in steps after which every tensor has been averaged
    once); ``weighting`` as in FedAvg. The simulator must run ``local_steps=1``.
    """

    name = "fedpa"

    def __init__(self, groups: int = DEFAULT_GROUPS, weighting: str = "samples"):
        super().__init__(weighting)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ConfigError(f"PartialAveraging groups={groups!r} is invalid; expected an integer >= 1 (τ)")
        self.groups = groups
        self._cohort: list[int] = []
        self._synced: set[int] = set()  # clients whose reply was accepted in round _synced_round
        self._synced_round = -1

    # -------------------------------------------------------------- setup and sampling

    def setup(self, model: nn.Module, num_clients: int, devices: list[DeviceProfile]) -> None:
        super().setup(model, num_clients, devices)
        units = _tensor_units(self.global_state, model)
        if self.groups > len(units):
            n = len(units)
            raise ConfigError(f"PartialAveraging groups={self.groups} exceeds the model's {n} communicated "
                              f"tensors (parameters with their buffers); use groups <= {n}")  # fmt: skip
        sizes = [sum(self.global_state[n].numel() for n in unit) for unit in units]
        keys = [str(i) for i in range(len(units))]
        split = balanced_groups(keys, sizes, self.groups)
        self.partition: list[list[str]] = [[n for key in group for n in units[int(key)]] for group in split]
        self.group_numel = [sum(self.global_state[n].numel() for n in g) for g in self.partition]
        self.imbalance = max(self.group_numel) / (sum(self.group_numel) / self.groups)
        self._names = list(communicated(self.global_state))

    def group(self, round_idx: int) -> list[str]:
        """The tensor names averaged in round ``round_idx``."""
        return self.partition[round_idx % self.groups]

    def sample(self, round_idx: int, k: int, rng: np.random.Generator, available: list[int]) -> list[int]:
        """A fresh cohort at the start of every block of τ rounds; the same cohort within the block."""
        present = set(available)
        cohort = [c for c in self._cohort if c in present]
        if round_idx % self.groups == 0 or not cohort:
            cohort = super().sample(round_idx, k, rng, available)
        self._cohort = cohort
        return list(cohort)

    # -------------------------------------------------------------- one round

    def configure(self, round_idx: int, cohort: list[int]) -> dict[int, Instruction]:
        full = communicated(self.global_state)
        synced = self._synced if self._synced_round == round_idx - 1 else set()
        last = {k: self.global_state[k] for k in self.group(round_idx - 1)} if round_idx > 0 else full
        return {cid: Instruction(last if cid in synced else full) for cid in cohort}

    def client_update(self, ctx: ClientContext, instruction: Instruction) -> Reply:
        if ctx.local.steps != 1:
            steps = ctx.local.steps
            raise ConfigError(f"fedpa (partial averaging) runs one local SGD step per round; got local_steps="
                              f"{steps}. Set local_steps=1 and groups=τ (rounds = τ x FedAvg's rounds)")  # fmt: skip
        state = ctx.state
        current = "round" in state and int(state["round"]) == ctx.round - 1
        if current:  # continue from this client's own local model
            load_arrays(ctx.model, {k[len("local.") :]: v for k, v in state.items() if k.startswith("local.")})
            buffers = {k[len("momentum.") :]: v for k, v in state.items() if k.startswith("momentum.")}
        elif set(instruction.arrays) != set(self._names):
            raise LeantrainError(f"fedpa: client {ctx.cid} holds no local model from round {ctx.round - 1} but was "
                                 "sent a partial update (client state lost?)")  # fmt: skip
        else:
            buffers = {}
        load_arrays(ctx.model, instruction.arrays)
        metrics = local_sgd(ctx.model, ctx.loss_fn, ctx.batches, ctx.local.steps, ctx.local.lr, ctx.local.momentum,
                            ctx.local.weight_decay, momentum_buffers=buffers)  # fmt: skip
        model_state = ctx.model.state_dict()
        ctx.state = {"round": torch.tensor(ctx.round)}
        ctx.state.update({f"local.{k}": v.detach().clone() for k, v in model_state.items()})
        ctx.state.update({f"momentum.{k}": v for k, v in buffers.items()})
        return Reply({k: model_state[k].detach().clone() for k in self.group(ctx.round)}, metrics)

    def expected_upload(self, round_idx: int, cid: int, instruction: Instruction) -> dict[str, tuple]:
        return {k: (tuple(self.global_state[k].shape), self.global_state[k].dtype) for k in self.group(round_idx)}

    def accumulate(self, round_idx: int, cid: int, reply: Reply) -> None:
        if getattr(self, "_mean", None) is None or self._mean_round != round_idx:
            self._accepted = set()
        self.add_to_mean(round_idx, reply)
        self._accepted.add(cid)

    def aggregate(self, round_idx: int) -> None:
        mean = self.take_mean(round_idx)
        accepted = self._accepted if mean is not None else set()
        if mean is not None:
            for k in self.group(round_idx):
                if k in mean:
                    self.global_state[k] = mean.mean(k, self.global_state[k])
        self._synced, self._synced_round = set(accepted), round_idx
        self._accepted = set()

    # -------------------------------------------------------------- evaluation and checkpoints

    def eval_state(self) -> dict[str, torch.Tensor]:
        """The server's copy: every group as last averaged."""
        return self.global_state

    def state_dict(self) -> dict[str, Any]:
        return {"global_state": dict(self.global_state), "cohort": list(self._cohort),
                "synced": sorted(self._synced), "synced_round": self._synced_round}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._cohort = [int(c) for c in state["cohort"]]
        self._synced = {int(c) for c in state["synced"]}
        self._synced_round = int(state["synced_round"])
