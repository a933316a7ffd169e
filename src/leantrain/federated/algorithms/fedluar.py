"""FedLUAR (Kim, Kang, Lee, "Layer-wise Update Aggregation with Recycling for Communication-Efficient Federated
Learning", NeurIPS 2025, arXiv 2503.11146; official code swblaster/FedLUAR): each round the server picks δ
low-priority kernel tensors ("layers"); clients do not upload them, and the server re-applies that layer's most
recent aggregated update instead ("recycling"). Priority is the update-to-weight ratio s_l = ‖Δ_l‖ / (‖x_l‖ + ε): a
small update on large weights changes the layer's function little, so layers are recycled with probability
∝ 1/s_l, drawn without replacement. Everything else is FedAvg (project spec, federated §1).

One round t (R_t = the recycled kernels, R_0 = ∅, so every kernel has a score before the first draw):

- down: the full global model to each sampled client, plus ``config["recycled"]``: the indices of R_t in the
  model's kernel list (omitted when R_t is empty; the ledger counts it as JSON);
- client: τ local SGD steps on the whole model, then upload every communicated tensor except those in R_t;
- server, kernel l ∉ R_t: Δ_l = mean_i x_l^i − x_l, last_update[l] = Δ_l, s_l = ‖Δ_l‖ / (‖x_l‖ + ε) with x_l
  before the update, x_l ← mean_i x_l^i; kernel l ∈ R_t: x_l ← x_l + last_update[l] (neither Δ nor s refreshed,
  so a layer recycled twice re-applies the same stale update); every other floating tensor (biases, norm affine
  parameters, norm running statistics) is averaged every round;
- R_{t+1}: δ kernels drawn without replacement with p_l ∝ 1/s_l by a generator seeded with (seed, t + 1), so a
  run, and a run resumed from a checkpoint, draws the same layers.

With ``recycled_layers=0`` the algorithm is FedAvg, bit for bit (same cohorts, bytes and global model).

Deliberate departures and choices:

- **Score epsilon.** The paper writes s = ‖Δ‖/‖x‖; the code adds 1e-6 to the denominator. ``score_eps=1e-6``
  (the code) is the default because a zero-initialised kernel would otherwise give an infinite score;
  ``score_eps=0`` is the paper's formula. In 1/s, scores are floored at 1e-12 (spec §1.9: zero updates must not
  divide by zero); a layer whose update was exactly zero is then almost surely recycled.
- **Weighting.** The paper averages with p_i = n_i/n (``weighting="samples"``, default); the code's unweighted
  mean is ``weighting="uniform"``. The same weights make Δ_l.
- **Fresh layers take the mean itself.** x_l ← mean (stored in the model's dtype), and Δ_l = mean − x_l is what
  gets recycled; computing x_l + Δ_l in float32 would round differently and break FedAvg equivalence at δ = 0.
- **Recycled layers are trained but not uploaded**, as in the official code (the paper only says they are not
  transmitted). Freezing them locally would change the other layers' training.
- **A round without any accepted reply changes nothing**: the global model, last_update, scores and R stay as
  they were (the code has no notion of a lost round).
- **Learning-rate decay** (spec §1.9): the recycled update was computed at the old rate; like the code, nothing
  is cleared at a decay boundary (the simulator's rate is constant anyway).
- **δ as a share of the kernels.** ``recycled_layers`` is a count (an ``int``, as in the code's config) or a fraction
  f in [0, 1) of the model's K kernel tensors (a ``float``), turned into δ = ⌊f·K⌋ at ``setup``. The default 0.5 is
  the paper's ratio (ResNet-20: 10-12 of ~21 kernels; FEMNIST CNN: 2 of 4) and fits every model (δ < K always); the
  code's absolute default 12 would raise on any model with ≤ 12 kernels.
- **Cap on consecutive recycling** (``max_consecutive=k``, not in the paper or code; default ``None`` = the paper):
  a kernel recycled k rounds in a row is not a candidate for the next draw, so it goes up fresh, which refreshes its
  stale update and score (the code never refreshes a recycled layer's score, so a low-score layer can be recycled
  for tens of rounds, re-applying one update). If fewer than δ kernels are candidates, all of them are recycled.
  See docs/fedluar.md for the measurement behind it.
- **Ablations** of the spec's CPU check (§1.8): ``selection="uniform"`` (uniform random layers),
  ``"min_score"`` / ``"max_score"`` (deterministic: the δ smallest / largest scores; the paper's sampler
  favours small scores, so ``"min_score"`` is its greedy version), and ``recycled_update="zero"`` (drop the
  layer's update instead of recycling it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.federated.algorithms.base import (
    Algorithm,
    ClientContext,
    Instruction,
    Reply,
    communicated,
    kernel_names,
    load_arrays,
)
from leantrain.federated.client import local_sgd
from leantrain.federated.clock import DeviceProfile

SELECTIONS = ("inverse_score", "uniform", "min_score", "max_score")
RECYCLED_UPDATES = ("last", "zero")
# default δ = ⌊0.5·K⌋ of the K kernels: the paper's ratio (ResNet-20: 10-12 of ~21 kernels; FEMNIST CNN: 2 of 4)
DEFAULT_RECYCLED_FRACTION = 0.5
SCORE_FLOOR = 1e-12  # 1/s uses max(s, SCORE_FLOOR): a zero update must not divide by zero
_SELECTION_STREAM = 0x1EA5  # separates the layer draw's generator from the simulator's cohort generator


def recycled_count(recycled_layers: int | float, num_kernels: int) -> int:
    """δ as a count: an integer as given, a fraction f in [0, 1) as ⌊f·K⌋ (always < K, so it fits any model)."""
    if isinstance(recycled_layers, float):
        return int(math.floor(recycled_layers * num_kernels + 1e-9))
    if recycled_layers >= num_kernels:
        raise ConfigError(
            f"FedLUAR recycled_layers={recycled_layers} is invalid for this model: it has {num_kernels} kernel "
            f"tensors (weights with more than one dimension), so use an integer 0 <= recycled_layers <= "
            f"{num_kernels - 1}, or a fraction of the kernels such as recycled_layers=0.5 (the default)"
        )
    return recycled_layers


def luar_score(update: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> float:
    """s_l = ‖Δ_l‖₂ / (‖x_l‖₂ + eps), in float64 (``weight`` is the tensor *before* the update)."""
    return float(update.double().norm()) / (float(weight.double().norm()) + eps)


def sample_recycled(scores: list[float], count: int, rng: np.random.Generator, selection: str = "inverse_score"):
    """Indices of ``count`` layers to recycle, drawn without replacement (sorted).

    ``"inverse_score"``: p_l ∝ 1/max(s_l, 1e-12) (the paper); ``"uniform"``; ``"min_score"`` / ``"max_score"``:
    the ``count`` smallest / largest scores (ties broken by layer order).
    """
    if count == 0:
        return []
    s = np.asarray(scores, dtype=np.float64)
    if selection == "inverse_score":
        inv = 1.0 / np.maximum(s, SCORE_FLOOR)
        chosen = rng.choice(len(s), size=count, replace=False, p=inv / inv.sum())
    elif selection == "uniform":
        chosen = rng.choice(len(s), size=count, replace=False)
    elif selection == "min_score":
        chosen = np.argsort(s, kind="stable")[:count]
    elif selection == "max_score":
        chosen = np.argsort(-s, kind="stable")[:count]
    else:
        raise ConfigError(f"FedLUAR selection={selection!r} is invalid; accepted: {SELECTIONS}")
    return sorted(int(i) for i in chosen)


class FedLUAR(Algorithm):
    """FedLUAR: recycle the last aggregated update of δ low-priority kernels instead of uploading them.

    ``recycled_layers`` is δ: an ``int`` count of kernel tensors (0 ≤ δ < number of kernels K; the official config
    uses 12 for ResNet-20's ~21) or a ``float`` fraction f in [0, 1) giving δ = ⌊f·K⌋ (default 0.5, the paper's
    ratio, valid on every model); ``score_eps`` the ε in the score's denominator; ``weighting`` "samples" (paper) or
    "uniform" (code); ``selection`` and ``recycled_update`` choose the spec's ablations; ``max_consecutive=k`` (not
    in the paper; ``None`` = no cap) never recycles a kernel more than k rounds in a row (see the module docstring).
    """

    name = "fedluar"

    def __init__(self, recycled_layers: int | float = DEFAULT_RECYCLED_FRACTION, weighting: str = "samples",
                 score_eps: float = 1e-6, selection: str = "inverse_score", recycled_update: str = "last",
                 max_consecutive: int | None = None):  # fmt: skip
        super().__init__(weighting)
        count_ok = isinstance(recycled_layers, int) and not isinstance(recycled_layers, bool) and recycled_layers >= 0
        share_ok = isinstance(recycled_layers, float) and 0.0 <= recycled_layers < 1.0
        if not (count_ok or share_ok):
            raise ConfigError(
                f"FedLUAR recycled_layers={recycled_layers!r} is invalid; expected an integer count >= 0 (below the "
                "model's number of kernel tensors) or a fraction of the kernel tensors in [0, 1), e.g. 0.5"
            )
        if max_consecutive is not None and (
            isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1
        ):
            raise ConfigError(
                f"FedLUAR max_consecutive={max_consecutive!r} is invalid; expected None (no cap, the paper) or an "
                "integer >= 1"
            )
        if not isinstance(score_eps, int | float) or isinstance(score_eps, bool) or not 0 <= score_eps < math.inf:
            raise ConfigError(f"FedLUAR score_eps={score_eps!r} is invalid; expected a finite number >= 0")
        if selection not in SELECTIONS:
            raise ConfigError(f"FedLUAR selection={selection!r} is invalid; accepted: {SELECTIONS}")
        if recycled_update not in RECYCLED_UPDATES:
            raise ConfigError(f"FedLUAR recycled_update={recycled_update!r} is invalid; accepted: {RECYCLED_UPDATES}")
        self.recycled_layers = recycled_layers
        self.max_consecutive = max_consecutive
        self.delta = recycled_layers if isinstance(recycled_layers, int) else 0  # δ as a count, fixed in setup
        self.score_eps = float(score_eps)
        self.selection = selection
        self.recycled_update = recycled_update
        self.last_update: dict[str, torch.Tensor] = {}
        self.scores: dict[str, float] = {}
        self.recycled: list[str] = []  # R_t of the coming round, in kernel order
        self.streak: dict[str, int] = {}  # consecutive rounds each kernel has been recycled, up to the last round

    def setup(self, model: nn.Module, num_clients: int, devices: list[DeviceProfile]) -> None:
        super().setup(model, num_clients, devices)
        self.delta = recycled_count(self.recycled_layers, len(self.kernels))
        self.last_update = {k: torch.zeros_like(self.global_state[k]) for k in self.kernels}
        self.scores, self.recycled = {}, []
        self.streak = {k: 0 for k in self.kernels}

    # -------------------------------------------------------------- one round

    def configure(self, round_idx: int, cohort: list[int]) -> dict[int, Instruction]:
        down = communicated(self.global_state)
        config = {"recycled": [self.kernels.index(k) for k in self.recycled]} if self.recycled else {}
        return {cid: Instruction(down, dict(config)) for cid in cohort}

    def client_update(self, ctx: ClientContext, instruction: Instruction) -> Reply:
        load_arrays(ctx.model, instruction.arrays)
        metrics = local_sgd(ctx.model, ctx.loss_fn, ctx.batches, ctx.local.steps, ctx.local.lr,
                            ctx.local.momentum, ctx.local.weight_decay)  # fmt: skip
        state = ctx.model.state_dict()
        skip = _recycled_names(instruction.config, kernel_names(state, ctx.model))
        return Reply({k: state[k].detach().clone() for k in instruction.arrays if k not in skip}, metrics)

    def expected_upload(self, round_idx: int, cid: int, instruction: Instruction) -> dict[str, tuple]:
        skip = _recycled_names(instruction.config, self.kernels)
        return {k: (tuple(v.shape), v.dtype) for k, v in instruction.arrays.items() if k not in skip}

    def accumulate(self, round_idx: int, cid: int, reply: Reply) -> None:
        self.add_to_mean(round_idx, reply)

    def aggregate(self, round_idx: int) -> None:
        mean = self.take_mean(round_idx)
        if mean is None:
            return  # no accepted reply this round: nothing changes (see the module docstring)
        recycled = set(self.recycled)
        self.streak = {k: self.streak.get(k, 0) + 1 if k in recycled else 0 for k in self.kernels}
        for k in list(self.global_state):
            x = self.global_state[k]
            if k in recycled:
                if self.recycled_update == "last":
                    self.global_state[k] = x + self.last_update[k]
            elif k in mean:
                fresh = mean.mean(k, x)
                if k in self.last_update:
                    self.last_update[k] = fresh - x
                    self.scores[k] = luar_score(self.last_update[k], x, self.score_eps)
                self.global_state[k] = fresh
        self.recycled = self._select(round_idx + 1)

    def _select(self, next_round: int) -> list[str]:
        """R_{next_round}: drawn from a generator seeded with (seed, next_round), so resumes draw the same.

        With ``max_consecutive=k``, kernels already recycled k rounds in a row are not candidates (they go up fresh,
        which refreshes their update and score); if fewer than δ candidates remain, all of them are recycled.
        """
        if self.delta == 0 or any(k not in self.scores for k in self.kernels):
            return []
        candidates = self.kernels
        if self.max_consecutive is not None:
            candidates = [k for k in self.kernels if self.streak.get(k, 0) < self.max_consecutive]
        count = min(self.delta, len(candidates))
        if count == 0:
            return []
        rng = np.random.default_rng([getattr(self, "seed", 0), next_round, _SELECTION_STREAM])
        chosen = sample_recycled([self.scores[k] for k in candidates], count, rng, self.selection)
        return [candidates[i] for i in chosen]

    # -------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_state": dict(self.global_state),
            "last_update": dict(self.last_update),
            "scores": dict(self.scores),
            "recycled": list(self.recycled),
            "streak": dict(self.streak),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.last_update = {k: v.clone() for k, v in state["last_update"].items()}
        self.scores = {k: float(v) for k, v in state["scores"].items()}
        self.recycled = list(state["recycled"])
        self.streak = {k: int(v) for k, v in state.get("streak", {}).items()}
        self._mean = None


def _recycled_names(config: dict[str, Any], kernels: list[str]) -> set[str]:
    """The kernel names listed (by index into the model's kernel list) in ``config["recycled"]``."""
    idx = config.get("recycled", [])
    if any(not isinstance(i, int) or not 0 <= i < len(kernels) for i in idx):
        raise ConfigError(f"FedLUAR config recycled={idx!r} does not index the model's {len(kernels)} kernels")
    return {kernels[i] for i in idx}
