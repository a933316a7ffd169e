"""EmbracingFL (Lee, Zhang, Prakash, Niu, Avestimehr, "Embracing Federated Learning: Enabling Weak Client
Participation via Partial Model Training", IEEE TMC 2024, arXiv 2406.15125).

Some clients cannot fit the full model's training footprint in memory. Instead of dropping them, or shrinking
every layer for them (HeteroFL, FjORD), EmbracingFL lets each client train the largest block of consecutive
*output-side* layers it can afford; the input-side prefix stays frozen on that client. In CNNs the activation
memory sits in the input-side layers and most parameters in the output-side ones, so a frozen prefix (run
forward without storing activations) saves most of the training memory, the classifier learns from every
client's data, and the low-level feature extractor is trained by the strong clients (project spec, federated §4).

The model is ordered into blocks, input to output (:mod:`leantrain.federated.blocks`): nn.Sequential / nn.ModuleList
containers are opened, any other module with parameters is one block (so a residual block is never split),
normalization layers and parameter-free modules join the block before them. For ResNet-20 that is the stem,
each of the 9 residual blocks and the head; for leantrain's "cnn", conv1, conv2, fc1 and fc2. Each device profile
gets a cut s: its clients train blocks s.. (strong: s = 0), receive the full model, and upload only the suffix
tensors (plus the cut index in the instruction). The server averages each tensor over the clients that trained
it and keeps the old value where nobody did.

The cut is the smallest s (the longest suffix) with ``memory_estimate(s) <= memory_fraction * memory_estimate(0)``,
the spec's Mem(s) in bytes:
``weights and buffers of the whole model (resident) + (1 + optimizer_slots) * bytes of the trained parameters
(their gradients and optimizer state) + batch_size * max(A(s), T(s))``, where A(s) is what autograd saves for
backward in blocks s.. per sample and T(s) the largest input + output of one layer of the frozen prefix per sample
(the prefix runs forward layer by layer without grad). Both are measured once at setup by a forward pass on a
batch of 2: ``saved_tensors_hooks`` collect the distinct storages each block keeps (parameters excluded) and
forward hooks on every layer record its input and output sizes and its multiply-accumulates.
``cuts={"weak": k, "moderate": j}`` (block indices) override the estimate per device profile.

Deliberate departures and choices:

- **max, not sum, of the suffix's activations and the prefix's transient.** The spec adds the two; but the
  prefix finishes its forward before the suffix saves anything, so they never coexist. With the sum, freezing a
  conv net's first (widest) layer "costs" more memory than training it (Mem(1) > Mem(0)).
- **What the memory model includes** (the paper's percentages are of the training footprint; its exact model is
  not known here): the terms above, nothing else (no framework overhead, no gradient-of-activation transients
  during backward). ``optimizer_slots=1`` (SGD momentum, the papers' optimizer) and ``batch_size=32`` (the
  papers' and the simulator's default batch) are options of the estimate, not read from the run. It assumes the
  blocks run as a chain. A budget that fits no suffix still trains the last block; :attr:`plan` marks it
  ``"fits": False`` (e.g. leantrain's "cnn" at 15% or 40%: the whole model's weights are already 8-16% of its
  footprint, and the first conv layer's no-grad forward takes another 39-57%).
- **Frozen prefix**: ``requires_grad=False`` and the prefix modules in eval mode while training (the spec's
  choice): BatchNorm normalizes with, and does not update, its running statistics; dropout is off there.
- **Default cuts** come from the memory model, not from the paper's tables (not available here). For ResNet-20
  at CIFAR size they are weak = blocks 8.. (the last two residual blocks + FC) and moderate = blocks 5.. (the
  last two blocks of stage 2, stage 3, FC), one block shorter than the spec's derivation (weak = stage 3 + FC,
  ``cuts={"weak": 7, "moderate": 4}``), which counts activation shares only.
- **Blocks** are ordered by their first call in the setup forward pass (registration order for modules never
  called); parameters registered directly on a custom root module belong to the first block. The setup pass
  needs an input: ``input_shape`` (per sample), else the model's ``config.input_shape``, else the first layer's
  width (``nn.Linear``), or token ids for an ``nn.Embedding`` first layer.
- **work** reported per client (the simulated clock's compute share) = (F + 2·F_s) / 3F, where F counts the
  multiply-accumulates of the layers with weights (a full forward; a backward ≈ 2x the trained suffix's F_s).
- **Weights** follow FedAvg (``weighting="samples"`` or ``"uniform"``), restricted to each tensor's contributors.
  With all clients strong this is FedAvg exactly (tested); the cut travels in the instruction's config only when
  it is not 0, so all-strong runs also count exactly FedAvg's bytes.
"""

from __future__ import annotations

import warnings
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
from leantrain.federated.blocks import PROBE_BATCH, ordered_blocks, suffix_tensors, suffix_work, train_suffix
from leantrain.federated.clock import PROFILES, DeviceProfile


class EmbracingFL(Algorithm):
    """Partial model training: each client trains the output-side suffix of blocks its memory budget fits.

    ``cuts`` maps device profile name -> first trained block index (overrides the memory estimate);
    ``batch_size`` and ``optimizer_slots`` parametrize the memory estimate; ``input_shape`` (per sample) is the
    setup probe's input when it cannot be inferred; ``weighting`` as in FedAvg.
    """

    name = "embracingfl"

    def __init__(self, cuts: dict[str, int] | None = None, weighting: str = "samples", batch_size: int = 32,
                 optimizer_slots: int = 1, input_shape: tuple[int, ...] | list[int] | None = None):  # fmt: skip
        super().__init__(weighting)
        if cuts is not None and not isinstance(cuts, dict):
            raise ConfigError(f"EmbracingFL cuts={cuts!r} is invalid; expected a dict profile -> block index")
        for profile, cut in (cuts or {}).items():
            if profile not in PROFILES:
                raise ConfigError(f"EmbracingFL cuts has unknown profile {profile!r}; choices: {', '.join(PROFILES)}")
            if isinstance(cut, bool) or not isinstance(cut, int) or cut < 0:
                raise ConfigError(f"EmbracingFL cuts[{profile!r}]={cut!r} is invalid; expected a block index >= 0")
        for name, value, low in (("batch_size", batch_size, 1), ("optimizer_slots", optimizer_slots, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"EmbracingFL {name}={value!r} is invalid; expected an integer >= {low}")
        if input_shape is not None and (not isinstance(input_shape, tuple | list) or not input_shape
                                        or not all(isinstance(d, int) and d >= 1 for d in input_shape)):  # fmt: skip
            raise ConfigError(f"EmbracingFL input_shape={input_shape!r} is invalid; expected positive integers")
        self.cuts = dict(cuts or {})
        self.batch_size, self.optimizer_slots = batch_size, optimizer_slots
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    # -------------------------------------------------------------- setup: blocks, memory, cuts

    def setup(self, model: nn.Module, num_clients: int, devices: list[DeviceProfile]) -> None:
        super().setup(model, num_clients, devices)
        self.blocks = ordered_blocks(model, self.input_shape)
        for profile, cut in self.cuts.items():
            if cut >= len(self.blocks):
                raise ConfigError(f"EmbracingFL cuts[{profile!r}]={cut} is out of range; the model has "
                                  f"{len(self.blocks)} blocks (valid cuts: 0..{len(self.blocks) - 1})")  # fmt: skip
        self._resident = sum(v.numel() * v.element_size() for v in model.state_dict().values())
        self._param_bytes = {n: p.numel() * p.element_size() for n, p in model.named_parameters() if p.requires_grad}
        self.plan: dict[str, dict[str, Any]] = {}
        for device in devices:
            if device.name not in self.plan:
                self.plan[device.name] = self._plan(device)
        for name, plan in self.plan.items():
            if not plan["fits"]:
                source = "the cut given in cuts" if name in self.cuts else "no cut of this model"
                warnings.warn(
                    f"EmbracingFL: {source} fits {name!r} clients' memory budget ({plan['budget_bytes'] / 1e6:.2f} MB "
                    f"< {plan['memory_bytes'] / 1e6:.2f} MB estimated for blocks {plan['cut']}.., "
                    f"{plan['trained_tensors']} tensor(s)); they train only that suffix anyway. The memory model "
                    "does not describe this model's weak clients: give cuts={profile: block} explicitly "
                    "(docs/embracingfl.md)", UserWarning, stacklevel=3)  # fmt: skip

    def memory_estimate(self, cut: int) -> int:
        """Estimated training memory in bytes of a client that trains blocks ``cut``.. (module docstring)."""
        suffix, prefix = self.blocks[cut:], self.blocks[:cut]
        trained = sum(self._param_bytes.get(t, 0) for b in suffix for t in b.tensors)
        saved: dict[int, int] = {}
        for b in suffix:
            saved.update(b.saved or {})
        activations = sum(saved.values())
        transient = max((b.transient for b in prefix), default=0)
        # the prefix runs (layer by layer, no grad) before the suffix saves anything: the peak is the larger one
        peak = max(activations, transient) * self.batch_size // PROBE_BATCH
        return self._resident + (1 + self.optimizer_slots) * trained + peak

    def work(self, cut: int) -> float:
        """Fraction of a full forward + backward that training blocks ``cut``.. costs (approximately)."""
        return suffix_work(self.blocks, cut)

    def _plan(self, device: DeviceProfile) -> dict[str, Any]:
        budget = device.memory_fraction * self.memory_estimate(0)
        if device.name in self.cuts:
            cut = self.cuts[device.name]
        else:
            fitting = [s for s in range(len(self.blocks)) if self.memory_estimate(s) <= budget]
            cut = fitting[0] if fitting else len(self.blocks) - 1
        memory = self.memory_estimate(cut)
        return {"cut": cut, "memory_bytes": memory, "budget_bytes": int(budget), "fits": memory <= budget,
                "work": self.work(cut), "trained_tensors": len(self.suffix(cut))}  # fmt: skip

    def suffix(self, cut: int) -> list[str]:
        """The communicated tensors a client with cut ``cut`` trains and uploads (model order)."""
        return suffix_tensors(self.blocks, cut, communicated(self.global_state))

    def cut_of(self, cid: int) -> int:
        return self.plan[self.devices[cid].name]["cut"]

    # -------------------------------------------------------------- one round

    def configure(self, round_idx: int, cohort: list[int]) -> dict[int, Instruction]:
        down = communicated(self.global_state)
        return {cid: Instruction(down, {"cut": c} if (c := self.cut_of(cid)) else {}) for cid in cohort}

    def client_update(self, ctx: ClientContext, instruction: Instruction) -> Reply:
        load_arrays(ctx.model, instruction.arrays)
        cut = int(instruction.config.get("cut", 0))
        metrics = train_suffix(ctx, self.blocks, cut, ctx.local.steps)
        state = ctx.model.state_dict()
        return Reply({k: state[k].detach().clone() for k in self.suffix(cut)}, {**metrics, "work": self.work(cut)})

    def expected_upload(self, round_idx: int, cid: int, instruction: Instruction) -> dict[str, tuple]:
        cut = int(instruction.config.get("cut", 0))
        return {k: (tuple(self.global_state[k].shape), self.global_state[k].dtype) for k in self.suffix(cut)}
