"""The algorithm interface both runtimes drive (leantrain's simulator and Flower), and aggregation helpers.

One round, as the runtime runs it:

1. ``cohort = algorithm.sample(round, k, rng, available)`` (uniform without replacement by default);
2. ``instructions = algorithm.configure(round, cohort)``: per client, the tensors sent down and a small config;
3. on each client: ``reply = algorithm.client_update(ctx, instruction)`` (local training; the tensors sent up);
4. the runtime checks each reply against ``algorithm.expected_upload(round, cid, instruction)`` (names, shapes,
   dtypes, finiteness) and rejects malformed ones without touching the server state;
5. ``algorithm.accumulate(round, cid, reply)`` for every accepted reply (streaming: nothing per client is kept),
   then ``algorithm.aggregate(round)``.

A round may have several **phases** (:meth:`Algorithm.phases`, one ``"train"`` phase by default): the runtime runs
steps 1-5 once per phase, in order, after ``algorithm.begin_phase(round, phase)``; each phase samples its own cohort
(the first phase with the round's generator, so every algorithm sees the same first cohorts) and aggregates before
the next begins (on-device KD: the auxiliary model's FedAvg, then the strong clients' distillation into the target
model). A multi-phase algorithm puts the phase's name in its instructions' config, so a client (on Flower, a fresh
object) knows what to run; the simulated clock adds the phases' durations; a client's batches in phase p > 0 are
seeded with (seed, round, client, p) (:func:`~leantrain.federated.simulator.batch_seed`).

Instructions and replies are what a Flower Message carries (an ArrayRecord of tensors and a ConfigRecord /
MetricRecord of scalars). Client state that must persist between rounds (stateful algorithms) lives in
``ctx.state``, which the simulator stores per client and Flower keeps in ``context.state``.

"Layer" follows the papers' code (project spec, federated §0.1): one trainable tensor; only tensors with more than
one dimension (conv and linear weights, "kernels") are candidates for layer-wise treatment; biases, norm affine
parameters and norm running statistics are averaged every round. Integer buffers (``num_batches_tracked``) are
never communicated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.federated.client import LocalTraining
from leantrain.federated.clock import DeviceProfile

WEIGHTINGS = ("samples", "uniform")


@dataclass
class Instruction:
    """What the server sends one client: tensors (counted in the ledger) and a JSON-able config."""

    arrays: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply:
    """What one client sends back: tensors and metrics.

    ``metrics`` hold ``loss`` and ``samples`` (samples processed this round) from local training, and
    ``num_examples``: the client's dataset size n_i, which ``weighting="samples"`` weighs by (p_i = n_i/n). The
    runtime's client side sets ``num_examples`` (see :func:`train_client`); the server caps it (``ReplyGuard``).
    """

    arrays: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ClientContext:
    """Everything ``client_update`` may use on a client."""

    cid: int
    round: int
    model: nn.Module  # the working model; the algorithm loads what it needs into it
    batches: Iterator[dict[str, torch.Tensor]]
    num_samples: int
    local: LocalTraining
    loss_fn: Any
    device: DeviceProfile
    state: dict[str, torch.Tensor]  # persistent per-client state (empty unless the algorithm stores something)
    unlabeled: Iterator[dict[str, torch.Tensor]] | None = None  # batches of the client's unlabeled rows (if any)


def train_client(algorithm: Algorithm, ctx: ClientContext, instruction: Instruction) -> Reply:
    """A client's side of a round in every runtime: the algorithm's update, plus the client's dataset size.

    ``metrics["num_examples"] = ctx.num_samples`` (n_i, what ``weighting="samples"`` weighs by) unless the
    algorithm set it; ``samples`` stays what local training processed.
    """
    reply = algorithm.client_update(ctx, instruction)
    if isinstance(reply, Reply) and isinstance(reply.metrics, dict):
        reply.metrics.setdefault("num_examples", ctx.num_samples)
    return reply


def communicated(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point entries of a state dict: what travels (integer buffers never do)."""
    return {k: v for k, v in state.items() if v.is_floating_point()}


def kernel_names(state: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Candidate "layers": trainable tensors with more than one dimension, in model order."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return [k for k, v in state.items() if k in trainable and v.ndim > 1]


def load_arrays(model: nn.Module, arrays: dict[str, torch.Tensor]) -> None:
    """Copy the named tensors into the model's parameters/buffers (others keep their values)."""
    own = model.state_dict()
    unknown = sorted(set(arrays) - set(own))
    if unknown:
        raise ConfigError(f"tensors {unknown[:5]} are not in the model")
    with torch.no_grad():
        for name, t in arrays.items():
            own[name].copy_(t)


class WeightedMean:
    """Streaming Σ wᵢxᵢ / Σ wᵢ per tensor name, accumulated in float64 (order-robust, exact for one client)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, float] = {}

    def add(self, name: str, tensor: torch.Tensor, weight: float) -> None:
        t = tensor.detach().to(torch.float64)
        if name in self.sums:
            self.sums[name].add_(t, alpha=weight)
            self.weights[name] += weight
        else:
            self.sums[name] = t * weight
            self.weights[name] = weight

    def mean(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return (self.sums[name] / self.weights[name]).to(like.dtype)

    def __contains__(self, name: str) -> bool:
        return name in self.sums and self.weights[name] > 0


class Algorithm:
    """Base class: FedAvg's sampling and bookkeeping; subclasses define what is sent, trained and aggregated.

    ``weighting="samples"`` weighs clients by their dataset size n_i (the papers' p_i = n_i/n; ``num_examples`` in
    the reply's metrics, not the samples processed this round); ``"uniform"`` by 1 (the official TF codes'
    unweighted mean).
    """

    name = "algorithm"
    # True declares that ``client_update`` is exactly: load the instruction's arrays into the model, ``local_sgd`` on
    # all parameters with ``ctx.local``'s settings and no persistent state, and reply with the model's values of the
    # instruction's names (plus local_sgd's metrics). Vectorised engines may then train such clients together
    # without calling ``client_update``. Only the class that defines ``client_update`` can declare it (a subclass
    # overriding ``client_update`` must declare it again).
    trains_full_model = False

    def __init__(self, weighting: str = "samples"):
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"{type(self).__name__} weighting={weighting!r} is invalid; accepted: {WEIGHTINGS}")
        self.weighting = weighting
        self.global_state: dict[str, torch.Tensor] = {}
        self.phase = "train"

    # -------------------------------------------------------------- setup and sampling

    def setup(self, model: nn.Module, num_clients: int, devices: list[DeviceProfile]) -> None:
        """Take the initial global model (its state dict) and the client population."""
        self.global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.num_clients = num_clients
        self.devices = devices
        self.kernels = kernel_names(self.global_state, model)

    def sample(self, round_idx: int, k: int, rng: np.random.Generator, available: list[int]) -> list[int]:
        """The round's cohort: ``k`` clients uniformly without replacement (sorted)."""
        return sorted(int(c) for c in rng.choice(available, size=min(k, len(available)), replace=False))

    def weight(self, reply: Reply) -> float:
        """The reply's aggregation weight: its client's dataset size n_i, or 1 with ``weighting="uniform"``."""
        if self.weighting == "uniform":
            return 1.0
        if "num_examples" not in reply.metrics:
            raise ConfigError("a reply without metrics['num_examples'] (the client's dataset size) cannot be "
                              "weighted by samples; runtimes set it (leantrain.federated.train_client)")  # fmt: skip
        return float(reply.metrics["num_examples"])

    def reference(self, name: str) -> torch.Tensor | None:
        """What a reply's tensor ``name`` is an update of (the server's value; None: not a server tensor).

        The reply guard measures a client's update of ``name`` as ``reply - reference(name)``."""
        return self.global_state.get(name)

    def add_to_mean(self, round_idx: int, reply: Reply) -> WeightedMean:
        """Fold one accepted reply into this round's streaming weighted mean (a fresh one each round)."""
        if getattr(self, "_mean", None) is None or self._mean_round != round_idx:
            self._mean, self._mean_round = WeightedMean(), round_idx
        w = self.weight(reply)
        for k, v in reply.arrays.items():
            self._mean.add(k, v, w)
        return self._mean

    def take_mean(self, round_idx: int) -> WeightedMean | None:
        """This round's mean (None when no reply was accepted this round); the accumulator is reset."""
        mean, self._mean = getattr(self, "_mean", None), None
        return mean if mean is not None and self._mean_round == round_idx else None

    # -------------------------------------------------------------- phases of a round

    def phases(self, round_idx: int) -> tuple[str, ...]:
        """The phases of round ``round_idx``, in order (one ``"train"`` phase unless an algorithm needs more)."""
        return ("train",)

    def begin_phase(self, round_idx: int, phase: str) -> None:
        """Called by the runtime before each phase's sampling; ``self.phase`` is what the server-side methods read."""
        self.phase = phase

    # -------------------------------------------------------------- one round (override)

    def configure(self, round_idx: int, cohort: list[int]) -> dict[int, Instruction]:
        raise NotImplementedError

    def client_update(self, ctx: ClientContext, instruction: Instruction) -> Reply:
        raise NotImplementedError

    def expected_upload(self, round_idx: int, cid: int, instruction: Instruction) -> dict[str, tuple]:
        """name -> (shape, dtype) of the tensors a well-formed reply carries."""
        raise NotImplementedError

    def deadline(self, round_idx: int, cohort: list[int], instructions: dict[int, Instruction]) -> float | None:
        """Simulated seconds after which the server closes this phase (None: it waits for every client).

        A client whose compute and transfers would end later is counted ``late`` and left out; the phase then lasts
        exactly the deadline (TimelyFL's aggregation interval, deadline FedAvg's cut-off)."""
        return None

    def accumulate(self, round_idx: int, cid: int, reply: Reply) -> None:
        """Default: fold the reply into this round's weighted mean."""
        self.add_to_mean(round_idx, reply)

    def aggregate(self, round_idx: int) -> None:
        """Default: every tensor some accepted reply carried becomes their weighted mean; the rest stay."""
        mean = self.take_mean(round_idx)
        if mean is None:
            return  # no accepted reply this round: the global model stays
        for k in list(self.global_state):
            if k in mean:
                self.global_state[k] = mean.mean(k, self.global_state[k])

    # -------------------------------------------------------------- evaluation and checkpoints

    def eval_state(self) -> dict[str, torch.Tensor]:
        """The model the runtime evaluates after a round (the global model by default)."""
        return self.global_state

    def state_dict(self) -> dict[str, Any]:
        """The server state to checkpoint (tensors and JSON-able values)."""
        return {"global_state": dict(self.global_state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_state = {k: v.clone() for k, v in state["global_state"].items()}
