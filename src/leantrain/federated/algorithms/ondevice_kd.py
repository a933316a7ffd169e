"""On-device knowledge distillation for weak clients (Lim, Jo, Zhang, Avestimehr, Lee, "Enabling Weak Client
Participation via On-device Knowledge Distillation in Heterogeneous Federated Learning", ECAI 2025, arXiv
2503.11151; official code jjihyunh/HeteroKDFL).

Weak clients cannot train the large target model T, so every client, weak ones included, trains a small auxiliary
model A by FedAvg on its labeled rows; strong clients also train T and distil A's knowledge into it on their own
*unlabeled* rows. Nothing but model weights leaves a device (no logits, no public data on the server). A round has
two phases (:meth:`Algorithm.phases`):

1. ``"aux"``: the sampled clients (any device) each run τ local SGD steps of cross-entropy on A; the server averages
   A (``A ← mean(A_i)``).
2. ``"target"``: the strong clients (all of those online by default, as the official code; ``strong_per_round``
   samples fewer) start from the global T and the *new* global A. Each runs (a) τ steps of cross-entropy on its
   labeled rows, updating T, then (b) ``kd_steps`` (default τ) steps on its unlabeled rows with the loss
   ``w(r) · temperature² · KL(softmax(A(x)/temperature) ‖ softmax(T(x)/temperature))``, updating T only (A is the
   teacher and is not updated). The server averages T.

The KD weight ramps up, ``w(r) = kd_weight · exp(−5 (1 − r/rampup_rounds)²)`` for r < rampup_rounds, then
``kd_weight`` (official: kd_weight 0.5, rampup 300 of 400 rounds, temperature 3). The evaluated model is T.

Server state: T's tensors under their own names and A's under ``"aux.<name>"``; A's tensors travel with that prefix.
Bytes: phase 1 sends |A| down and up per sampled client, phase 2 |T| + |A| down (the teacher) and |T| up per strong
client (project spec, federated §5.3).

The auxiliary model: ``aux_model`` is a model spec ``{"name": ..., **options}`` built for T's input shape and
classes, or a zero-argument callable; by default T's architecture with every width (``channels``, ``hidden``,
``hidden_sizes`` of its config) scaled by ``aux_width`` = 0.25 (the paper's ResNet-20 x0.25 auxiliary model).

Choices and departures (documented in docs/ondevice_kd.md too):

- **Teacher in eval mode** (``teacher_mode="eval"``, the spec's advice). The official code runs the teacher with
  ``training=True`` (batch statistics; it also updates A's BN running statistics): ``teacher_mode="train"``.
- **KL direction** KL(teacher ‖ student), as the official code (Keras ``KLDivergence(teacher, student)``), summed
  over classes and averaged over the batch, times temperature².
- **Two optimizers**: steps (a) and (b) each start a fresh SGD optimizer (``local_sgd``); the official code keeps one
  Keras optimizer (and its momentum) per worker slot across both steps and across rounds, which the spec calls a
  leak (project spec §0.1).
- **Weighting**: ``weighting="samples"`` (the papers' p_i = n_i/n, FedAvg's default here); the official code's
  unweighted mean is ``weighting="uniform"``.
- **Strong participation**: the official code has every strong client in every round's phase 2; that is the
  default (``strong_per_round=None``), ``strong_per_round=k`` samples k of the online strong clients.
- **Excluding weak clients** (``aux_clients="strong"``): phase 1 samples strong clients only; the ablation that
  measures what the weak clients' participation adds.
- **Compute accounting** for the simulated clock: phase 1 reports ``work`` = A's forward MACs / T's; phase 2 counts
  the CE and KD samples at T's cost (the teacher's forward, ~1/16 of T's for a 0.25-width A, is not counted).
- A strong client without unlabeled rows skips step (b) (it reports ``kd_samples`` 0).
- On Flower each round is two exchanges (the Strategy runs the ``aux`` phase inside ``configure_train``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
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
from leantrain.federated.blocks import forward_macs
from leantrain.federated.client import local_sgd

PREFIX = "aux."
TEACHER_MODES = ("eval", "train")
AUX_CLIENTS = ("all", "strong")
_WIDTH_FIELDS = ("channels", "hidden", "hidden_sizes")


def scaled_copy(model: nn.Module, width: float) -> nn.Module:
    """A fresh model of ``model``'s class whose config widths (channels, hidden, hidden_sizes) are scaled by
    ``width`` (at least 1 each)."""
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise ConfigError(f"on-device KD cannot scale {type(model).__name__} (no dataclass config); pass aux_model")
    changes: dict[str, Any] = {}
    for name in _WIDTH_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int):
            changes[name] = max(1, round(value * width))
        elif isinstance(value, tuple | list):
            changes[name] = type(value)(max(1, round(v * width)) for v in value)
    if not changes:
        raise ConfigError(f"on-device KD: {type(model).__name__}'s config has no width field {_WIDTH_FIELDS}; "
                          "pass aux_model")  # fmt: skip
    return type(model)(dataclasses.replace(config, **changes))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """temperature² · KL(softmax(teacher/T) ‖ softmax(student/T)), summed over classes, averaged over the batch."""
    return (temperature**2) * F.kl_div(
        F.log_softmax(student_logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
        reduction="batchmean", log_target=True,
    )  # fmt: skip


class OnDeviceKD(Algorithm):
    """FedAvg of a small auxiliary model on every client, distilled into the target model on strong clients.

    ``aux_model`` (spec dict or callable; default: T scaled by ``aux_width``), ``temperature``, ``kd_weight``
    (l_max), ``rampup_rounds`` (ap), ``kd_steps`` (None: τ), ``strong_per_round`` (None: every online strong client),
    ``strong_profiles`` (the device profiles that can train T), ``aux_clients`` ("all", or "strong" to leave weak
    clients out), ``teacher_mode`` ("eval", or "train" as the official code), ``weighting`` as in FedAvg.
    """

    name = "kd"

    def __init__(self, aux_model: dict | Callable[[], nn.Module] | None = None, aux_width: float = 0.25,
                 temperature: float = 3.0, kd_weight: float = 0.5, rampup_rounds: int = 300,
                 kd_steps: int | None = None, strong_per_round: int | None = None,
                 strong_profiles: tuple[str, ...] | list[str] = ("strong",), aux_clients: str = "all",
                 teacher_mode: str = "eval", weighting: str = "samples"):  # fmt: skip
        super().__init__(weighting)
        if aux_model is not None and not (isinstance(aux_model, dict) and "name" in aux_model or callable(aux_model)):
            raise ConfigError(f"on-device KD aux_model={aux_model!r} is invalid; expected {{name: ..., **options}} "
                              "or a callable returning a model")  # fmt: skip
        for name, value in (("aux_width", aux_width), ("temperature", temperature)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"on-device KD {name}={value!r} is invalid; expected a number > 0")
        if not isinstance(kd_weight, int | float) or isinstance(kd_weight, bool) or kd_weight < 0:
            raise ConfigError(f"on-device KD kd_weight={kd_weight!r} is invalid; expected a number >= 0")
        for name, value in (("rampup_rounds", rampup_rounds), ("kd_steps", kd_steps),
                            ("strong_per_round", strong_per_round)):  # fmt: skip
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"on-device KD {name}={value!r} is invalid; expected an integer >= 0")
        if aux_clients not in AUX_CLIENTS:
            raise ConfigError(f"on-device KD aux_clients={aux_clients!r} is invalid; accepted: {AUX_CLIENTS}")
        if teacher_mode not in TEACHER_MODES:
            raise ConfigError(f"on-device KD teacher_mode={teacher_mode!r} is invalid; accepted: {TEACHER_MODES}")
        if isinstance(strong_profiles, str) or not strong_profiles:
            raise ConfigError(f"on-device KD strong_profiles={strong_profiles!r} is invalid; expected a list of names")
        self.aux_spec, self.aux_width = aux_model, float(aux_width)
        self.temperature, self.kd_weight, self.rampup_rounds = float(temperature), float(kd_weight), rampup_rounds
        self.kd_steps, self.strong_per_round = kd_steps, strong_per_round
        self.strong_profiles = tuple(strong_profiles)
        self.aux_clients, self.teacher_mode = aux_clients, teacher_mode

    # -------------------------------------------------------------- setup

    def build_aux(self, model: nn.Module) -> nn.Module:
        """The auxiliary model A for target ``model`` (under a fixed seed, so server and clients agree)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(getattr(self, "seed", 0) + 1)
            if self.aux_spec is None:
                return scaled_copy(model, self.aux_width)
            if callable(self.aux_spec):
                return self.aux_spec()
            from leantrain.models import build_model

            options = {k: v for k, v in self.aux_spec.items() if k != "name"}
            config = getattr(model, "config", None)
            for key in ("input_shape", "num_classes"):
                if config is not None and hasattr(config, key):
                    options.setdefault(key, getattr(config, key))
            return build_model(self.aux_spec["name"], **options)

    def setup(self, model: nn.Module, num_clients: int, devices: list) -> None:
        super().setup(model, num_clients, devices)
        self.aux = self.build_aux(model)
        self.target_names = list(self.global_state)
        aux_state = {PREFIX + k: v.detach().clone() for k, v in self.aux.state_dict().items()}
        clash = sorted(set(aux_state) & set(self.global_state))
        if clash:
            raise ConfigError(f"on-device KD: the target model already has tensors named {clash[:3]}")
        self.global_state.update(aux_state)
        shape = getattr(getattr(model, "config", None), "input_shape", None)
        try:
            self.aux_work = forward_macs(self.aux, shape) / max(forward_macs(model, shape), 1)
        except ConfigError:  # the input shape cannot be inferred: parameter counts as the proxy
            self.aux_work = sum(p.numel() for p in self.aux.parameters()) / sum(p.numel() for p in model.parameters())

    def strong(self, cid: int) -> bool:
        """Whether client ``cid`` can train T (its profile, or the base of a per-client "strong-7" profile)."""
        return self.devices[cid].name.split("-")[0] in self.strong_profiles

    def kd_weight_at(self, round_idx: int) -> float:
        """w(r): the sigmoid-shaped ramp-up to ``kd_weight`` over ``rampup_rounds`` rounds."""
        if not self.rampup_rounds or round_idx >= self.rampup_rounds:
            return self.kd_weight
        return self.kd_weight * math.exp(-5.0 * (1.0 - round_idx / self.rampup_rounds) ** 2)

    # -------------------------------------------------------------- one round: two phases

    def phases(self, round_idx: int) -> tuple[str, ...]:
        return ("aux", "target")

    def sample(self, round_idx, k, rng, available):
        strong = [c for c in available if self.strong(c)]
        if self.phase == "aux":
            return super().sample(round_idx, k, rng, strong if self.aux_clients == "strong" else available)
        if self.strong_per_round is None or self.strong_per_round >= len(strong):
            return sorted(strong)
        return super().sample(round_idx, self.strong_per_round, rng, strong)

    def _aux_arrays(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in communicated(self.global_state).items() if k.startswith(PREFIX)}

    def _target_arrays(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in communicated(self.global_state).items() if not k.startswith(PREFIX)}

    def configure(self, round_idx: int, cohort: list[int]) -> dict[int, Instruction]:
        if self.phase == "aux":
            return {cid: Instruction(self._aux_arrays(), {"phase": "aux"}) for cid in cohort}
        down = {**self._target_arrays(), **self._aux_arrays()}
        config = {"phase": "target", "kd_weight": self.kd_weight_at(round_idx)}
        return {cid: Instruction(down, config) for cid in cohort}

    def expected_upload(self, round_idx: int, cid: int, instruction: Instruction) -> dict[str, tuple]:
        if instruction.config.get("phase") == "aux":
            names = self._aux_arrays()
        else:
            names = self._target_arrays()
        return {k: (tuple(v.shape), v.dtype) for k, v in names.items()}

    def eval_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.global_state.items() if not k.startswith(PREFIX)}

    def aux_state(self) -> dict[str, torch.Tensor]:
        """The global auxiliary model A (its own tensor names)."""
        return {k[len(PREFIX) :]: v for k, v in self.global_state.items() if k.startswith(PREFIX)}

    # -------------------------------------------------------------- the client

    def client_update(self, ctx: ClientContext, instruction: Instruction) -> Reply:
        phase = instruction.config.get("phase")
        aux_in = {k[len(PREFIX) :]: v for k, v in instruction.arrays.items() if k.startswith(PREFIX)}
        load_arrays(self.aux, aux_in)
        local = ctx.local
        if phase == "aux":
            metrics = local_sgd(self.aux, ctx.loss_fn, ctx.batches, local.steps, local.lr, local.momentum,
                                local.weight_decay)  # fmt: skip
            state = self.aux.state_dict()
            return Reply({PREFIX + k: state[k].detach().clone() for k in aux_in}, {**metrics, "work": self.aux_work})
        if phase != "target":
            raise ConfigError(f"on-device KD: unknown phase {phase!r} in the instruction")
        load_arrays(ctx.model, {k: v for k, v in instruction.arrays.items() if not k.startswith(PREFIX)})
        metrics = local_sgd(ctx.model, ctx.loss_fn, ctx.batches, local.steps, local.lr, local.momentum,
                            local.weight_decay)  # fmt: skip
        weight = float(instruction.config.get("kd_weight", self.kd_weight))
        kd = {"loss": float("nan"), "samples": 0}
        if weight > 0 and ctx.unlabeled is not None:
            self.aux.train(self.teacher_mode == "train")
            for p in self.aux.parameters():
                p.requires_grad_(False)
            try:
                kd = local_sgd(ctx.model, self._distil(weight), ctx.unlabeled, self.kd_steps or local.steps, local.lr,
                               local.momentum, local.weight_decay)  # fmt: skip
            finally:
                for p in self.aux.parameters():
                    p.requires_grad_(True)
        state = ctx.model.state_dict()
        up = {k: state[k].detach().clone() for k in instruction.arrays if not k.startswith(PREFIX)}
        return Reply(up, {"loss": metrics["loss"], "kd_loss": kd["loss"], "kd_samples": kd["samples"],
                          "samples": metrics["samples"] + kd["samples"], "work": 1.0})  # fmt: skip

    def _distil(self, weight: float):
        teacher, temperature = self.aux, self.temperature

        def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                target = teacher(batch["x"])
            return weight * kd_loss(model(batch["x"]), target, temperature)

        return loss
