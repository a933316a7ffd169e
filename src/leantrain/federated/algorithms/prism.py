"""PriSM (Niu, Prakash, Kundu, Lee, Avestimehr, "Federated Learning of Large Models at the Edge via Principal
Sub-Model Training", FL-NeurIPS'22 workshop, arXiv 2208.13141; TMLR 2023 as "Overcoming Resource Constraints in
Federated Learning: Large Models Can Be Trained with only Weak Clients").

When no client can train the full model, PriSM rewrites each eligible conv kernel in its orthogonal (SVD) basis,
W = U S Vᵀ reshaped to out × (in·k²), with √S absorbed into both factors: a k×k "V-conv" in -> r (rows of
V = √S Vᵀ) followed by a 1×1 "U-conv" r -> out (columns of U = U√S), r = min(out, in·k²). Every round each client
trains a sub-model made of n_keep = ⌈keep·r⌉ of the r principal kernels per layer, sampled without replacement with
probability p_j ∝ s_j^γ, so the kernels with large singular values are trained more often while across clients
almost all of them are trained. Each sub-model is a low-rank approximation of the full model (project spec,
federated §8).

Here the working model stays the user's model: a client trains the kept slices U[:, idx] and V[idx, :] as leaf
tensors and the layer's weight is computed as (U_kept V_kept) reshaped (``torch.func.functional_call``), which is
mathematically the V-conv + 1×1 U-conv of the paper. The server keeps the ordinary global state dict; the factors
are the SVD of the global weight, taken in ``configure``. Only the kept slices, the other tensors and the index
lists (JSON ints in the instruction's config) travel; the client does not need the unsampled kernels at all.
Aggregation: kernel j of a layer is the weighted mean over the clients that trained it (weights per
``weighting``: n_i, or 1 = the paper's 1/count_j); kernels nobody trained keep their values; other tensors are
averaged as in FedAvg. Then the server re-orthogonalizes: W' = U V is the new global weight, and the next round's
SVD of W' re-splits it (the sign/permutation ambiguity of the SVD is harmless: kernels are re-sampled each round).

Eligible layers: convolutions (groups 1) that are not the input conv (in_channels 1 or 3) and not 1×1; linear
layers too with ``decompose_linear=True`` (off by default: the paper keeps FC layers dense); ``layers`` names the
modules explicitly instead. ``keep`` is a float or a dict device profile -> keep (profiles missing from the dict
train everything, keep = 1); the README's heterogeneous variant is e.g. ``{"weak": 0.2, "moderate": 0.4,
"strong": 0.6}``. ``basis="channels"`` is the baseline the paper compares with (random-subset / width-reduction
sub-models, FedDropout- and HeteroFL-like): the same layers, but each client trains a uniformly sampled subset of
the *original* output channels (rows of W and their bias entries) and the dropped channels output zero.

Deliberate departures from the paper and the official code (yuehniu/modeldecomp-fl), and choices:

- **Sampling** p_j ∝ s_j^γ (γ = ``gamma``, default 1; 0 = uniform), the paper's importance-aware intent and the
  official LSTM path. The official conv path uses softmax(s) (``sampling="softmax"``), which depends on the scale
  of the weights; ``--random-mask`` is ``gamma=0``. Sampling happens on the server, seeded with (seed, round,
  client), and the drawn indices travel with the instruction, so both runtimes draw the same sub-models.
- **Activation subset**: the code hard-codes training only the first 40% of U's output rows (the rest are zeroed
  on clients). Off by default here (``out_keep=1.0``); ``out_keep=0.4`` reproduces it (the first
  ⌈out_keep·out⌉ rows travel and train; the other output channels are zero on the client, the server keeps them).
- **Momentum buffers** are not exchanged (the code averages SGD momentum on the server and pushes it back). Each
  client starts a fresh optimizer every round (standard FL, spec §0.1); the re-orthogonalization also changes
  the basis the buffers would be expressed in.
- **Weight decay** (the local ``weight_decay``): plain L2 on the non-decomposed parameters, and on U/V the
  Frobenius decay of the spec, the gradient of (wd/2)·‖U_kept V_kept‖²_F: wd·(U V)Vᵀ and wd·Uᵀ(U V). Both are
  added as gradient hooks (local SGD runs with weight_decay=0), so the reported loss is the task loss only.
- **Warm-up rounds** of the code (full training before masking) are not provided.
- **Weighting** defaults to the toolkit's n_i-weighted mean (``weighting="samples"``); the code's unweighted mean
  (1/count_j for kernels, 1/m for the rest) is ``weighting="uniform"``.
- **work** (the simulated clock's compute share) counts the paper's two-conv sub-model: per decomposed layer
  positions·(n_keep·in·k² + out_kept·n_keep) multiply-accumulates against positions·out·in·k² dense, all other
  layers in full (measured once at setup with a forward pass; per-parameter counts when the input shape is
  unknown). Our client computes the same function as one dense conv with the product weight; at keep = 1 the
  two-conv form can cost more than the dense layer (r·(in·k² + out) > out·in·k²), and ``work`` says so.
- **Channel baseline**: the layers after a dropped channel are sent in full and averaged as in FedAvg; their
  weights fed by a dropped channel get no gradient on that client (it outputs zero). HeteroFL would also cut those
  columns from the message and average them over their holders only, so this baseline sends a little more and
  dilutes those columns' updates by about ``keep`` (stated with every comparison in docs/prism.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from leantrain.errors import ConfigError
from leantrain.federated.algorithms.base import (
    Algorithm,
    ClientContext,
    Instruction,
    Reply,
    communicated,
    load_arrays,
)
from leantrain.federated.client import local_sgd, trainable_only
from leantrain.federated.clock import PROFILES, DeviceProfile

SAMPLINGS = ("power", "softmax")
BASES = ("svd", "channels")
CONFIG_KEY = "prism"  # instruction.config["prism"]: weight name -> sorted kernel indices
SUFFIX_U, SUFFIX_V, SUFFIX_ROWS, SUFFIX_BIAS = ".prism_u", ".prism_v", ".prism_rows", ".prism_bias"
_SEED_TAG = 0x5052  # separates PriSM's sampling stream from the runtime's (seed, round, client) streams


# ---------------------------------------------------------------------------- decomposition and sampling


def principal_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, V, S) with U V == weight reshaped to out × (in·k²): U = U√S (out × r), V = √S Vᵀ (r × in·k²), S (r,).

    Computed in float64 and returned in the weight's dtype; r = min(out, in·k²)."""
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)  # (out, D)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (out, r), (r,), (r, D)
    root = s.sqrt()
    return (u * root).to(weight.dtype), (root[:, None] * vh).to(weight.dtype), s.to(weight.dtype)


def sampling_probabilities(s: np.ndarray, gamma: float = 1.0, rule: str = "power") -> np.ndarray:
    """Each kernel's probability of being drawn first: ∝ s^γ ("power"; γ = 0 is uniform) or softmax(s)."""
    s = np.maximum(np.asarray(s, dtype=np.float64), 0.0)
    p = np.exp(s - s.max()) if rule == "softmax" else s**gamma
    total = p.sum()
    return p / total if total > 0 else np.full(len(s), 1.0 / len(s))


def sample_kernels(s: np.ndarray, n: int, rng: np.random.Generator, gamma: float = 1.0,
                   rule: str = "power") -> list[int]:  # fmt: skip
    """``n`` distinct kernel indices (sorted), drawn one after another with :func:`sampling_probabilities`.

    Kernels of probability 0 (zero singular values) are drawn, uniformly, only when too few others exist."""
    p = sampling_probabilities(s, gamma, rule)
    positive = np.flatnonzero(p > 0)
    if len(positive) >= n:
        idx = rng.choice(len(p), size=n, replace=False, p=p)
    else:
        rest = rng.choice(np.flatnonzero(p <= 0), size=n - len(positive), replace=False)
        idx = np.concatenate([positive, rest])
    return sorted(int(i) for i in idx)


@dataclass
class PrincipalLayer:
    """One decomposed layer: its weight (and bias) names, weight shape, kernel count r and compute per position."""

    module: str
    weight: str
    bias: str | None
    shape: tuple[int, ...]  # (out, in, *kernel) or (out, in)
    kernels: int  # r = min(out, D) for the SVD basis, out for the channel basis
    positions: int = 1  # output positions of one sample's forward (spatial size; 1 for linear layers)

    @property
    def fan_in(self) -> int:  # D = in·k²
        return math.prod(self.shape[1:])


def eligible(module: nn.Module, decompose_linear: bool) -> bool:
    """The paper's rule: a conv (groups 1) that is neither the input conv (in_channels 1 or 3) nor 1×1; linear
    layers only when ``decompose_linear``."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.groups == 1 and module.in_channels not in (1, 3) and math.prod(module.kernel_size) > 1
    return decompose_linear and isinstance(module, nn.Linear)


class _SubModel(nn.Module):
    """The working model whose decomposed weights (and channel-basis biases) come from the trained slices."""

    def __init__(self, model: nn.Module, build):
        super().__init__()
        self.model = model
        self.build = build  # () -> {state-dict name: tensor} replacing the model's own values in forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.build(), args, kwargs)


@contextmanager
def _decay_hooks(dense: list[torch.Tensor], pairs: list[tuple[torch.Tensor, torch.Tensor]], rows: list[torch.Tensor],
                 wd: float) -> Iterator[None]:  # fmt: skip
    """Gradient hooks adding plain L2 (``dense``, channel ``rows``) and Frobenius decay on (U, V) ``pairs``."""
    handles = []
    if wd > 0:
        for p in dense + rows:
            handles.append(p.register_hook(lambda g, p=p: g + wd * p.detach()))
        for u, v in pairs:  # d/dU (wd/2)||U V||² = wd (U V) Vᵀ ; d/dV = wd Uᵀ (U V)
            handles.append(u.register_hook(lambda g, u=u, v=v: g + wd * (u.detach() @ v.detach()) @ v.detach().T))
            handles.append(v.register_hook(lambda g, u=u, v=v: g + wd * u.detach().T @ (u.detach() @ v.detach())))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class PriSM(Algorithm):
    """Principal sub-model training: each client trains ⌈keep·r⌉ sampled principal kernels of each eligible layer.

    ``keep``: the share of kernels per client (float in (0, 1], or dict device profile -> share); ``gamma``:
    sampling exponent (p ∝ s^γ; 0 = uniform); ``sampling``: "power" or "softmax" (the official conv code);
    ``basis``: "svd" (PriSM) or "channels" (random original output channels, the paper's baseline);
    ``decompose_linear``: decompose linear layers too; ``layers``: module names to decompose (None: the paper's
    rule); ``out_keep``: share of output rows of U a client trains (the code's activation subset, 0.4 there);
    ``input_shape`` (per sample) for the compute probe; ``weighting`` as in FedAvg. See the module docstring.
    """

    name = "prism"

    def __init__(self, keep: float | dict[str, float] = 0.2, gamma: float = 1.0, sampling: str = "power",
                 basis: str = "svd", decompose_linear: bool = False, layers: list[str] | None = None,
                 out_keep: float = 1.0, weighting: str = "samples",
                 input_shape: tuple[int, ...] | list[int] | None = None):  # fmt: skip
        super().__init__(weighting)
        shares = keep if isinstance(keep, dict) else {"": keep}
        for profile, share in shares.items():
            if profile and profile not in PROFILES:
                raise ConfigError(f"PriSM keep has unknown profile {profile!r}; choices: {', '.join(PROFILES)}")
            if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
                where = f"keep[{profile!r}]" if profile else "keep"
                raise ConfigError(f"PriSM {where}={share!r} is invalid; expected a number in (0, 1]")
        if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0 <= gamma < math.inf:
            raise ConfigError(f"PriSM gamma={gamma!r} is invalid; expected a finite number >= 0 (0: uniform)")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"PriSM sampling={sampling!r} is invalid; accepted: {SAMPLINGS}")
        if basis not in BASES:
            raise ConfigError(f"PriSM basis={basis!r} is invalid; accepted: {BASES}")
        if isinstance(out_keep, bool) or not isinstance(out_keep, int | float) or not 0 < out_keep <= 1:
            raise ConfigError(f"PriSM out_keep={out_keep!r} is invalid; expected a number in (0, 1]")
        if basis == "channels" and out_keep != 1:
            raise ConfigError("PriSM out_keep applies to basis='svd' only; the channel basis already drops channels")
        if layers is not None and not (isinstance(layers, list | tuple) and all(isinstance(x, str) for x in layers)):
            raise ConfigError(f"PriSM layers={layers!r} is invalid; expected a list of module names")
        self.keep = dict(keep) if isinstance(keep, dict) else float(keep)
        self.gamma, self.sampling, self.basis = float(gamma), sampling, basis
        self.decompose_linear, self.out_keep = bool(decompose_linear), float(out_keep)
        self.layer_names = list(layers) if layers is not None else None
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    # -------------------------------------------------------------- setup

    def setup(self, model: nn.Module, num_clients: int, devices: list[DeviceProfile]) -> None:
        super().setup(model, num_clients, devices)
        modules = dict(model.named_modules())
        if self.layer_names is not None:
            unknown = [m for m in self.layer_names if m not in modules]
            if unknown:
                raise ConfigError(f"PriSM layers {unknown} are not modules of the model")
            bad = [m for m in self.layer_names if not isinstance(modules[m], nn.modules.conv._ConvNd | nn.Linear)
                   or getattr(modules[m], "groups", 1) != 1]  # fmt: skip
            if bad:
                raise ConfigError(f"PriSM layers {bad} are not convolutions (groups 1) or linear layers")
            chosen = self.layer_names
        else:
            chosen = [n for n, m in modules.items() if eligible(m, self.decompose_linear)]
        if not chosen:
            raise ConfigError("PriSM found no layer to decompose (the paper's rule: convs other than the input conv "
                              "and 1x1 convs); pass decompose_linear=True or layers=[module names]")  # fmt: skip
        self.layers: list[PrincipalLayer] = []
        for name in chosen:
            w = modules[name].weight
            bias = f"{name}.bias" if getattr(modules[name], "bias", None) is not None else None
            out, fan_in = w.shape[0], math.prod(w.shape[1:])
            r = min(out, fan_in) if self.basis == "svd" else out
            self.layers.append(PrincipalLayer(name, f"{name}.weight", bias, tuple(w.shape), r))
        self._replaced = {x.weight for x in self.layers}
        if self.basis == "channels":
            self._replaced |= {x.bias for x in self.layers if x.bias}
        self._macs = self._probe(model, modules)
        self._parts: dict[str, dict[str, torch.Tensor]] | None = None
        self._sent: dict[int, dict[str, list[int]]] = {}

    def _probe(self, model: nn.Module, modules: dict[str, nn.Module]) -> int:
        """One forward pass: every decomposed layer's output positions; returns the model's MACs per sample."""
        shape = self.input_shape or getattr(getattr(model, "config", None), "input_shape", None)
        weighted = [m for m in modules.values() if not list(m.children()) and any(True for _ in m.parameters(False))]
        positions = {id(m): 1 for m in weighted}
        if shape is not None:

            def hook(module, args, out):
                if isinstance(out, torch.Tensor) and out.ndim > 2 and isinstance(module, nn.modules.conv._ConvNd):
                    positions[id(module)] = math.prod(out.shape[2:])

            handles = [m.register_forward_hook(hook) for m in weighted]
            modes = {m: m.training for m in model.modules()}
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    model.eval()
                    model(torch.zeros(1, *shape))
            finally:
                for h in handles:
                    h.remove()
                for m, mode in modes.items():
                    m.training = mode
        for layer in self.layers:
            layer.positions = positions.get(id(modules[layer.module]), 1)
        return sum(positions[id(m)] * sum(p.numel() for p in m.parameters(False)) for m in weighted)

    def keep_of(self, cid: int) -> float:
        """Client ``cid``'s share of kernels (from its device profile when ``keep`` is a dict)."""
        return float(self.keep.get(self.devices[cid].name, 1.0)) if isinstance(self.keep, dict) else self.keep

    def work(self, kept: dict[str, int]) -> float:
        """Fraction of the dense model's compute the sub-model with ``kept[weight]`` kernels per layer costs."""
        saved = 0
        for x in self.layers:
            out = x.shape[0]
            n = kept[x.weight]
            sub = n * x.fan_in + (math.ceil(self.out_keep * out) * n if self.basis == "svd" else 0)
            saved += x.positions * (out * x.fan_in - sub)
        return (self._macs - saved) / self._macs if self._macs else 1.0

    # -------------------------------------------------------------- server: factors and instructions

    def parts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per decomposed weight, the full tensors clients get slices of (U, V, S; or rows and bias); cached until
        the next aggregation (the re-orthogonalization is the SVD of the aggregated weight, taken here)."""
        if self._parts is None:
            self._parts = {}
            for x in self.layers:
                w = self.global_state[x.weight]
                if self.basis == "svd":
                    u, v, s = principal_factors(w)
                    self._parts[x.weight] = {"u": u, "v": v, "s": s}
                else:
                    self._parts[x.weight] = {"rows": w.reshape(w.shape[0], -1)}
                    if x.bias:
                        self._parts[x.weight]["bias"] = self.global_state[x.bias]
        return self._parts

    def _rows_u(self, x: PrincipalLayer) -> int:
        return math.ceil(self.out_keep * x.shape[0])

    def configure(self, round_idx: int, cohort: list[int]) -> dict[int, Instruction]:
        parts = self.parts()
        dense = {k: v for k, v in communicated(self.global_state).items() if k not in self._replaced}
        out, self._sent = {}, {}
        for cid in cohort:
            rng = np.random.default_rng([getattr(self, "seed", 0), round_idx, cid, _SEED_TAG])
            arrays, indices = dict(dense), {}
            for x in self.layers:
                n = min(x.kernels, max(1, math.ceil(self.keep_of(cid) * x.kernels - 1e-9)))
                p = parts[x.weight]
                if self.basis == "svd":
                    idx = sample_kernels(p["s"].numpy(), n, rng, self.gamma, self.sampling)
                    arrays[x.weight + SUFFIX_U] = p["u"][: self._rows_u(x), idx].contiguous()  # (out_kept, n)
                    arrays[x.weight + SUFFIX_V] = p["v"][idx].contiguous()  # (n, D)
                else:
                    idx = sorted(int(i) for i in rng.choice(x.kernels, size=n, replace=False))
                    arrays[x.weight + SUFFIX_ROWS] = p["rows"][idx].contiguous()  # (n, D)
                    if x.bias:
                        arrays[x.weight + SUFFIX_BIAS] = p["bias"][idx].contiguous()  # (n,)
                indices[x.weight] = idx
            self._sent[cid] = indices
            out[cid] = Instruction(arrays, {CONFIG_KEY: indices})
        return out

    def expected_upload(self, round_idx: int, cid: int, instruction: Instruction) -> dict[str, tuple]:
        return {k: (tuple(v.shape), v.dtype) for k, v in instruction.arrays.items()}

    # -------------------------------------------------------------- client

    def client_update(self, ctx: ClientContext, instruction: Instruction) -> Reply:
        indices = instruction.config.get(CONFIG_KEY)
        if not isinstance(indices, dict) or set(indices) != {x.weight for x in self.layers}:
            raise ValueError(f"PriSM instruction lacks kernel indices for {[x.weight for x in self.layers]}")
        slice_names = {k for k in instruction.arrays if k.endswith((SUFFIX_U, SUFFIX_V, SUFFIX_ROWS, SUFFIX_BIAS))}
        dense = {k: v for k, v in instruction.arrays.items() if k not in slice_names}
        load_arrays(ctx.model, dense)
        leaves = {k: nn.Parameter(instruction.arrays[k].detach().clone()) for k in sorted(slice_names)}
        if self.basis == "svd":
            pairs, rows = [(leaves[x.weight + SUFFIX_U], leaves[x.weight + SUFFIX_V]) for x in self.layers], []
        else:
            pairs, rows = [], [leaves[x.weight + SUFFIX_ROWS] for x in self.layers]
        wrapper = _SubModel(ctx.model, lambda: self._weights(leaves, indices))
        wrapper.slices = nn.ParameterList(leaves.values())  # the same Parameter objects: local SGD trains them
        own = {n for n, p in ctx.model.named_parameters() if n not in self._replaced}
        decayed = [p for n, p in ctx.model.named_parameters() if n in own and p.requires_grad]
        with trainable_only(ctx.model, own), _decay_hooks(decayed, pairs, rows, ctx.local.weight_decay):
            metrics = local_sgd(wrapper, ctx.loss_fn, ctx.batches, ctx.local.steps, ctx.local.lr, ctx.local.momentum)
        state = ctx.model.state_dict()
        arrays = {k: (leaves[k] if k in leaves else state[k]).detach().clone() for k in instruction.arrays}
        kept = {w: len(idx) for w, idx in indices.items()}
        return Reply(arrays, {**metrics, "work": self.work(kept)})

    def _weights(self, leaves: dict[str, torch.Tensor], indices: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """The decomposed layers' weights (and channel-basis biases) built from the trained slices."""
        out = {}
        for x in self.layers:
            size = x.shape[0]
            if self.basis == "svd":
                u, v = leaves[x.weight + SUFFIX_U], leaves[x.weight + SUFFIX_V]  # (out_kept, n), (n, D)
                w = u @ v
                if w.shape[0] < size:  # the activation subset: the other output channels are zero here
                    w = torch.cat([w, w.new_zeros(size - w.shape[0], w.shape[1])])
                out[x.weight] = w.reshape(x.shape)
            else:
                idx = torch.as_tensor(indices[x.weight], dtype=torch.long)
                r = leaves[x.weight + SUFFIX_ROWS]
                out[x.weight] = r.new_zeros(size, r.shape[1]).index_copy(0, idx, r).reshape(x.shape)
                if x.bias:
                    b = leaves[x.weight + SUFFIX_BIAS]
                    out[x.bias] = b.new_zeros(size).index_copy(0, idx, b)
        return out

    # -------------------------------------------------------------- server: aggregation

    def accumulate(self, round_idx: int, cid: int, reply: Reply) -> None:
        dense = {k: v for k, v in reply.arrays.items() if not k.endswith((SUFFIX_U, SUFFIX_V, SUFFIX_ROWS,
                                                                          SUFFIX_BIAS))}  # fmt: skip
        self.add_to_mean(round_idx, Reply(dense, reply.metrics))
        if getattr(self, "_sums_round", None) != round_idx:
            self._sums, self._counts, self._sums_round = {}, {}, round_idx
        w = self.weight(reply)
        for x in self.layers:
            idx = torch.as_tensor(self._sent[cid][x.weight], dtype=torch.long)
            counts = self._counts.setdefault(x.weight, torch.zeros(x.kernels, dtype=torch.float64))
            counts.index_add_(0, idx, torch.full((len(idx),), w, dtype=torch.float64))
            for key, suffix, axis in self._slices():
                if key not in self.parts()[x.weight]:
                    continue  # a channel-basis layer without bias
                full = self.parts()[x.weight][key]
                sums = self._sums.setdefault(x.weight + suffix, torch.zeros(full.shape, dtype=torch.float64))
                t = reply.arrays.get(x.weight + suffix)
                if t is None:
                    continue
                target = sums[: t.shape[0]] if key == "u" else sums  # the activation subset's rows
                target.index_add_(axis, idx, t.detach().to(torch.float64) * w)

    def _slices(self) -> list[tuple[str, str, int]]:
        if self.basis == "svd":
            return [("u", SUFFIX_U, 1), ("v", SUFFIX_V, 0)]
        return [("rows", SUFFIX_ROWS, 0), ("bias", SUFFIX_BIAS, 0)]

    def aggregate(self, round_idx: int) -> None:
        super().aggregate(round_idx)  # the non-decomposed tensors (FedAvg over the accepted replies)
        if getattr(self, "_sums_round", None) != round_idx:
            return  # no accepted reply this round: the global model stays
        parts = self.parts()
        for x in self.layers:
            counts = self._counts[x.weight]
            trained = counts > 0
            new = {}
            for key, suffix, axis in self._slices():
                if key not in parts[x.weight]:
                    continue
                old = parts[x.weight][key].to(torch.float64)
                shape = [1] * old.ndim
                shape[axis] = -1
                mean = self._sums[x.weight + suffix] / counts.clamp_min(1e-300).reshape(shape)
                keep_old = ~trained.reshape(shape)
                if key == "u":  # rows past the activation subset were never trained
                    keep_old = keep_old | (torch.arange(old.shape[0]) >= self._rows_u(x))[:, None]
                new[key] = torch.where(keep_old, old, mean)
            like = self.global_state[x.weight]
            if self.basis == "svd":
                self.global_state[x.weight] = (new["u"] @ new["v"]).reshape(x.shape).to(like.dtype)  # W' = U V
            else:
                self.global_state[x.weight] = new["rows"].reshape(x.shape).to(like.dtype)
                if x.bias:
                    self.global_state[x.bias] = new["bias"].to(like.dtype)
        self._parts, self._sums_round = None, None  # next configure re-splits W' by SVD (re-orthogonalization)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._parts = None
