"""FedLAMA (Lee, Zhang, He, Avestimehr, "Layer-wise Adaptive Model Aggregation for Scalable Federated Learning",
AAAI 2023, arXiv 2110.10302; official code swblaster/FedLAMA): layers drift apart across clients at different
rates, so each kernel tensor ("layer") gets its own aggregation interval, τ' or φτ'. Every φ rounds the layers
are sorted by their unit discrepancy d_l and the least critical ones (small d_l, large size), up to and including
the point where their cumulative discrepancy share δ_l crosses their remaining size share 1 − λ_l, are synced
only once per φ-round block (Algorithm 2). Most of the parameter volume is then sent φ times less often while the
layers that drift most are still averaged every round (project spec, federated §2).

Round granularity follows the code: one round = τ' local steps (the simulator's ``local_steps``); intervals are
1 or φ rounds. The cohort is drawn at the first round of each φ-round block and kept for the whole block; its
clients keep their local model between rounds (the layers they hold locally live in ``ctx.state``). Round r of
the block [b, b + φ):

- down: at r = b the full global model; later in the block only the layers averaged at the end of round r − 1
  (every communicated tensor except the relaxed kernels), plus ``config["relaxed"]``: the indices of the relaxed
  kernels in the model's kernel list, in every round but the block's last (omitted when empty);
- client: τ' local SGD steps on the whole model; uploads every communicated tensor except the relaxed kernels,
  which it keeps in ``ctx.state``; in the block's last round it uploads everything and drops its state;
- server: each uploaded tensor l is averaged, u_l = Σ p_i x_l^i, and for trainable tensors the unit discrepancy
  d_l = Σ p_i ‖u_l − x_l^i‖² / (interval_l · τ' · dim_l) is recorded, computed while streaming as
  Σ p_i ‖x_l^i‖² − ‖u_l‖² (float64 accumulators, clamped at 0);
- at the block's last round, after ``warmup_rounds``, the intervals are re-assigned by Algorithm 2 over the
  kernels (:func:`less_critical_layers`). Biases, norm affine parameters and norm running statistics are synced
  every round.

With ``phi=1`` every round is a whole block and the algorithm is FedAvg, bit for bit.

``eval_state()`` is the global model. At a block end every layer has just been averaged, so it is the average of
the cohort's models. Mid-block the relaxed kernels still hold their value from the last block end (their local
copies are not on the server) while every other tensor holds the latest average: a "virtual" global model that
no client holds. Evaluate at block ends (``eval_every=phi``) to compare with FedAvg fairly.

Deliberate departures and choices:

- **No warm-up by default.** The paper re-assigns intervals every φτ' iterations from the start; the code only
  when ``round > 5``. ``warmup_rounds=0`` is the paper, ``warmup_rounds=6`` the code (re-assignment at a block
  end r only when r ≥ warmup_rounds; all intervals stay 1 before).
- **Algorithm 2 normaliser.** Paper: δ_l and λ_l both over the candidate layers (``delta_denominator=
  "kernels"``, default). The code divides the cumulative discrepancy by the sum over *all* trainable tensors
  (biases included) while λ counts kernels only: ``delta_denominator="trainable"``. The crossing layer is
  included in the relaxed set, as in the code; ties in d_l keep model order.
- **BN running statistics are averaged every round** (spec §2.7). The code never averages them and evaluates
  one rank's local model; a simulator has no such model, so that behaviour is not offered.
- **Weighting.** p_i = n_i/n (paper, ``weighting="samples"``, default) or the code's unweighted mean
  (``"uniform"``), for both the average and d_l.
- **Lost clients.** A cohort client whose reply was not accepted in any round of the current block so far (it
  dropped out, failed or was rejected, e.g. at the block's first round) holds no local copy of the relaxed
  layers, so the server sends it the full model again (counted in the ledger). A round without any accepted
  reply changes nothing; at a block end it also skips the interval re-assignment.
- A client keeps a one-element marker in ``ctx.state`` after a block end instead of an empty dict, because the
  simulator only persists non-empty states; otherwise its previous block's layers would stay stored.
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
    kernel_names,
    load_arrays,
)
from leantrain.federated.client import local_sgd
from leantrain.federated.clock import DeviceProfile

DELTA_DENOMINATORS = ("kernels", "trainable")
_MARKER = "fedlama.round"  # ctx.state key of the round the client's held layers come from


def less_critical_layers(discrepancy: dict[str, float], sizes: dict[str, int], total_discrepancy: float | None = None):
    """Algorithm 2: the layers that get the long interval φτ', and the curves it walked.

    Sorts ``discrepancy`` (name -> d_l) ascending, accumulates δ_l = Σ_{j≤l} d_j·dim_j / D and
    λ_l = Σ_{j≤l} dim_j / Σ dim_j, and takes layers up to and including the first one where δ_l > 1 − λ_l.
    ``D`` is Σ d_j·dim_j over the given layers unless ``total_discrepancy`` is passed (the code's normaliser over
    all trainable tensors). Returns (relaxed names in sorted order, {"order", "delta", "one_minus_lambda"}).
    """
    order = sorted(discrepancy, key=lambda k: discrepancy[k])  # stable: ties keep the given (model) order
    weighted = {k: discrepancy[k] * sizes[k] for k in order}
    denominator = sum(weighted.values()) if total_discrepancy is None else total_discrepancy
    total_size = sum(sizes[k] for k in order)
    relaxed, deltas, gaps, cum_d, cum_size = [], [], [], 0.0, 0
    for k in order:
        cum_d += weighted[k]
        cum_size += sizes[k]
        delta = cum_d / denominator if denominator > 0 else 0.0
        gap = 1.0 - cum_size / total_size
        relaxed.append(k)
        deltas.append(delta)
        gaps.append(gap)
        if gap < delta:  # the crossing layer is included, as in the code
            break
    return relaxed, {"order": order, "delta": deltas, "one_minus_lambda": gaps}


class FedLAMA(Algorithm):
    """FedLAMA: per-layer aggregation intervals of 1 or ``phi`` rounds, re-assigned every ``phi`` rounds.

    ``phi`` is the interval increase factor (integer ≥ 1; 1 is FedAvg; the code's default 2); ``warmup_rounds``
    the rounds before the first re-assignment (0: paper; 6: code); ``delta_denominator`` "kernels" (paper) or
    "trainable" (code); ``weighting`` "samples" (paper) or "uniform" (code).
    """

    name = "fedlama"

    def __init__(self, phi: int = 2, warmup_rounds: int = 0, weighting: str = "samples",
                 delta_denominator: str = "kernels"):  # fmt: skip
        super().__init__(weighting)
        for field, value, low in (("phi", phi, 1), ("warmup_rounds", warmup_rounds, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"FedLAMA {field}={value!r} is invalid; expected an integer >= {low}")
        if delta_denominator not in DELTA_DENOMINATORS:
            raise ConfigError(
                f"FedLAMA delta_denominator={delta_denominator!r} is invalid; accepted: {DELTA_DENOMINATORS}"
            )
        self.phi, self.warmup_rounds, self.delta_denominator = phi, warmup_rounds, delta_denominator
        self.relaxed: list[str] = []  # kernels with interval phi during the current block, in kernel order
        self.discrepancy: dict[str, float] = {}  # d_l of the last sync of each trainable tensor
        self.cohort: list[int] = []
        self.block_state: set[int] = set()  # cohort clients that hold their relaxed layers for this block
        self.curves: dict[str, list] = {}  # Algorithm 2's last walk (for plots; spec §2.6)

    def setup(self, model: nn.Module, num_clients: int, devices: list[DeviceProfile]) -> None:
        super().setup(model, num_clients, devices)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.trainable = [k for k in self.global_state if k in trainable]
        self._trainable = set(self.trainable)
        self.relaxed, self.discrepancy, self.cohort, self.block_state, self.curves = [], {}, [], set(), {}

    @property
    def intervals(self) -> dict[str, int]:
        """Aggregation interval in rounds (1 or phi) of each kernel during the current block."""
        return {k: self.phi if k in self.relaxed else 1 for k in self.kernels}

    def _block_end(self, round_idx: int) -> bool:
        return (round_idx + 1) % self.phi == 0

    # -------------------------------------------------------------- one round

    def sample(self, round_idx: int, k: int, rng: np.random.Generator, available: list[int]) -> list[int]:
        """A new cohort at the first round of each phi-round block; the same cohort for the rest of it."""
        if round_idx % self.phi == 0 or not self.cohort:
            self.cohort = super().sample(round_idx, k, rng, available)
            self.block_state = set()
        present = set(available)
        return [c for c in self.cohort if c in present]

    def configure(self, round_idx: int, cohort: list[int]) -> dict[int, Instruction]:
        full = communicated(self.global_state)
        held = set(self.relaxed) if round_idx % self.phi else set()
        synced = {k: v for k, v in full.items() if k not in held}
        end = self._block_end(round_idx)
        config = {"relaxed": [self.kernels.index(k) for k in self.relaxed]} if self.relaxed and not end else {}
        return {cid: Instruction(synced if cid in self.block_state else full, dict(config)) for cid in cohort}

    def client_update(self, ctx: ClientContext, instruction: Instruction) -> Reply:
        missing = [k for k in communicated(ctx.model.state_dict()) if k not in instruction.arrays]
        if missing:  # mid-block: the relaxed layers come from this client's own model of the previous round
            held = ctx.state.get(_MARKER)
            block_start = ctx.round - ctx.round % self.phi
            if held is None or int(held) < block_start or any(k not in ctx.state for k in missing):
                raise LeantrainError(
                    f"FedLAMA client {ctx.cid} holds no local copy of {missing[:3]} from this block (round "
                    f"{ctx.round}); a client must receive the full model in its first round of a block"
                )
            load_arrays(ctx.model, {k: ctx.state[k] for k in missing})
        load_arrays(ctx.model, instruction.arrays)
        metrics = local_sgd(ctx.model, ctx.loss_fn, ctx.batches, ctx.local.steps, ctx.local.lr,
                            ctx.local.momentum, ctx.local.weight_decay)  # fmt: skip
        metrics["local_steps"] = ctx.local.steps
        state = ctx.model.state_dict()
        kept = _relaxed_names(instruction.config, kernel_names(state, ctx.model))
        if kept or ctx.state:  # keep only what is held until the next round of this block
            ctx.state.clear()
            ctx.state.update({k: state[k].detach().clone() for k in kept})
            ctx.state[_MARKER] = torch.tensor(ctx.round)
        return Reply({k: state[k].detach().clone() for k in communicated(state) if k not in kept}, metrics)

    def expected_upload(self, round_idx: int, cid: int, instruction: Instruction) -> dict[str, tuple]:
        kept = _relaxed_names(instruction.config, self.kernels)
        full = communicated(self.global_state)
        return {k: (tuple(v.shape), v.dtype) for k, v in full.items() if k not in kept}

    def accumulate(self, round_idx: int, cid: int, reply: Reply) -> None:
        if getattr(self, "_mean", None) is None or self._mean_round != round_idx:
            self._squares, self._steps = {}, int(reply.metrics.get("local_steps", 1))
        self.add_to_mean(round_idx, reply)
        w = self.weight(reply)
        for k, v in reply.arrays.items():
            if k in self._trainable:
                self._squares[k] = self._squares.get(k, 0.0) + w * float(v.detach().double().square().sum())
        self.block_state.add(cid)

    def aggregate(self, round_idx: int) -> None:
        mean = self.take_mean(round_idx)
        if mean is None:
            return  # no accepted reply this round: nothing changes
        relaxed = set(self.relaxed)
        for k in list(self.global_state):
            if k not in mean:
                continue
            if k in self._squares:
                u = mean.sums[k] / mean.weights[k]  # the float64 average
                spread = max(self._squares[k] / mean.weights[k] - float(u.square().sum()), 0.0)
                interval = self.phi if k in relaxed else 1
                self.discrepancy[k] = spread / (interval * self._steps * u.numel())
            self.global_state[k] = mean.mean(k, self.global_state[k])
        if self._block_end(round_idx) and round_idx >= self.warmup_rounds and self.phi > 1:
            self._reassign()

    def _reassign(self) -> None:
        """Algorithm 2 over the kernels; the result holds for the next block."""
        sizes = {k: self.global_state[k].numel() for k in self.kernels}
        d = {k: self.discrepancy[k] for k in self.kernels}
        total = None
        if self.delta_denominator == "trainable":
            total = sum(self.discrepancy[k] * self.global_state[k].numel() for k in self.trainable)
        chosen, self.curves = less_critical_layers(d, sizes, total)
        self.relaxed = [k for k in self.kernels if k in set(chosen)]

    # -------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_state": dict(self.global_state),
            "relaxed": list(self.relaxed),
            "discrepancy": dict(self.discrepancy),
            "cohort": list(self.cohort),
            "block_state": sorted(self.block_state),
            "curves": dict(self.curves),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.relaxed = list(state["relaxed"])
        self.discrepancy = {k: float(v) for k, v in state["discrepancy"].items()}
        self.cohort = [int(c) for c in state["cohort"]]
        self.block_state = {int(c) for c in state["block_state"]}
        self.curves = dict(state["curves"])
        self._mean = None


def _relaxed_names(config: dict[str, Any], kernels: list[str]) -> set[str]:
    """The kernel names listed (by index into the model's kernel list) in ``config["relaxed"]``."""
    idx = config.get("relaxed", [])
    if any(not isinstance(i, int) or not 0 <= i < len(kernels) for i in idx):
        raise ConfigError(f"FedLAMA config relaxed={idx!r} does not index the model's {len(kernels)} kernels")
    return {kernels[i] for i in idx}
