"""The vectorised engine: the cohort's clients train together, one batched SGD step for all of them at a time.

Every client of a round starts from its instruction's arrays; their parameters are stacked along a new leading
"client" dimension and one ``torch.func.vmap(grad_and_value(...))`` over ``functional_call`` computes every
client's loss and gradient of a local step at once; the SGD update (momentum, weight decay, lr, a fresh optimizer
state per client, exactly as :func:`~leantrain.federated.client.local_sgd`) is applied to the stacked tensors.

Same results as sequential training (to float rounding, tests hold it to 1e-5):

- Batches: each client's row indices for all its local steps are drawn as :meth:`ClientData.batches` draws them
  (the same seeded generator, the same ``randperm`` calls, the same slicing), then the rows of all clients for a
  step are gathered with one index. Batches of unequal size (a client's last partial batch of an epoch, a client
  smaller than the batch size) are padded to the largest one with copies of the batch's own first row and a
  per-row mask, so each client's loss is the mean over its real rows only and padding adds nothing to its
  gradient (a copy of a real row keeps the padding finite whenever the real rows are).
- Faults: :meth:`Simulator.client_fault` decides dropouts and mid-round crashes (a crashing client stops after its
  k steps and fails with ``ClientFailure: injected client failure mid-round``); a client whose loss is not finite
  stops there and fails with ``FloatingPointError: local loss is ...``; the others go on untouched (a stopped
  client's rows are masked out of the update). Replies pass :meth:`Simulator.tamper` (the fault hook).
- After the round the working model holds the last trained client's parameters and the global RNG is seeded as
  :meth:`Simulator.train_one` leaves it, so everything downstream sees what the sequential engine leaves.

What is vectorised: algorithms that declare ``trains_full_model`` (FedAvg: ``client_update`` is exactly load the
arrays, local_sgd on all parameters, reply the values), models without buffers and without active dropout (batch
norm statistics and dropout's random masks would not match), the simulator's classification loss, the standard
batch stream. Anything else is trained by :meth:`Simulator.train_one` one client at a time, and
:meth:`Engine.describe` says why.

:class:`AutoEngine` ("auto") measures on the real work: the first round of each (model architecture, cohort size,
batch width, input shape) trains a few clients sequentially and the rest vectorised, timing both per client; later
rounds use the faster engine. "auto" vectorises only models made of linear layers and element-wise activations
(:data:`EXACT_LAYERS`); "vmap" also vectorises convolutions (to float rounding, except where a near-tie in a
max-pool or ReLU flips; see :data:`EXACT_LAYERS`). Every engine's :meth:`~Engine.describe` ("vmap (100 clients
together)", "sequential (model has buffers)") goes into each round row as ``engine``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leantrain.errors import ConfigError
from leantrain.federated.algorithms.base import Reply
from leantrain.federated.client import ClientData
from leantrain.federated.engines.base import DROPPED, ClientOutcome, Engine

FAILURE_REASON = "ClientFailure: injected client failure mid-round"
MEMORY_BUDGET = 256 * 2**20  # bytes of stacked parameters, optimizer state and step inputs per vectorised group


# ---------------------------------------------------------------------------------------------- what is supported


def declares_full_model(algorithm: Any) -> bool:
    """Whether the class that defines the algorithm's ``client_update`` declares ``trains_full_model = True``."""
    for cls in type(algorithm).__mro__:
        if "client_update" in cls.__dict__:
            return cls.__dict__.get("trains_full_model", False) is True
    return False


def model_unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot be vectorised exactly (None: it can)."""
    if next(model.buffers(), None) is not None:
        return "model has buffers"
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return "model has active dropout"
        if isinstance(module, nn.RReLU):
            return "model has a random activation"
    params = list(model.named_parameters())
    if not params:
        return "model has no parameters"
    if not all(p.requires_grad for _, p in params):
        return "model has frozen parameters"
    if not all(p.is_floating_point() for _, p in params):
        return "model has non-float parameters"
    return None


# Layers whose vectorised kernels (batched matmuls, element-wise ops) reproduce the sequential ones to float rounding.
# Convolutions become one grouped convolution over the clients, whose different summation order can flip a max-pool
# or ReLU decision at a near-tie and change that client's gradient by more than rounding (measured: 6e-5 on one
# client's update in 20 after one step of a small CNN); "auto" therefore trains models with other layers
# sequentially, while "vmap" vectorises them when asked to.
EXACT_LAYERS = (nn.Linear, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU,
                nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Softmax,
                nn.LogSoftmax)  # fmt: skip


def inexact_layers(model: nn.Module) -> list[str]:
    """Names of the model's leaf layer types outside :data:`EXACT_LAYERS` (sorted)."""
    leaves = (m for m in model.modules() if next(m.children(), None) is None)
    return sorted({type(m).__name__ for m in leaves if not isinstance(m, EXACT_LAYERS)})


def cohort_unsupported(sim: Any, cohort: list[int], instructions: dict) -> str | None:
    """Why this round's cohort cannot be vectorised exactly (None: it can)."""
    from leantrain.federated.simulator import Simulator
    from leantrain.train.tasks import ClassificationTask

    if not declares_full_model(sim.algorithm):
        return f"algorithm {getattr(sim.algorithm, 'name', type(sim.algorithm).__name__)} is not plain local SGD"
    why = model_unsupported(sim.model)
    if why is not None:
        return why
    if getattr(sim.loss_fn, "__func__", None) is not ClassificationTask.loss:
        return "custom loss"
    if type(sim).client_batches is not Simulator.client_batches or type(sim.client_data).batches is not (
        ClientData.batches
    ):
        return "custom batches"
    arrays = sim.client_data.arrays
    if "x" not in arrays or "labels" not in arrays or arrays["labels"].ndim != 1:
        return "data is not x + class labels"
    if arrays["labels"].is_floating_point() or (len(arrays["labels"]) and int(arrays["labels"].min()) < 0):
        return "labels are not class indices"
    params = dict(sim.model.named_parameters())
    for cid in cohort:
        given = instructions[cid].arrays
        if set(given) != set(params):
            return "instructions do not carry exactly the model's parameters"
        for name, p in params.items():
            t = given[name]
            if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.dtype != p.dtype:
                return f"instruction tensor {name} does not match the model"
    return None


# ---------------------------------------------------------------------------------------------- batches


def batch_positions(n: int, batch_size: int, seed: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions into a client's index array of its first ``steps`` batches, as :meth:`ClientData.batches` draws
    them: (rows (steps, b) int64, counts (steps,)), b = min(batch_size, n); a short batch's rows are padded with its
    own first row."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = -(-n // batch_size)
    epochs = -(-steps // per_epoch)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(epochs)]).numpy()
    s = np.arange(steps)
    epoch, k = s // per_epoch, s % per_epoch
    start = epoch * n + k * batch_size
    counts = np.minimum(batch_size, n - k * batch_size)
    width = min(batch_size, n)
    offset = np.arange(width)
    pos = start[:, None] + np.where(offset[None, :] < counts[:, None], offset[None, :], 0)
    return order[pos], counts


def cohort_batches(sim: Any, r: int, cids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``cids``' training-row indices for every local step of round ``r``: (rows (C, steps, B) int64, counts
    (C, steps) int64), B the largest batch; rows past a batch's count repeat its first row (masked out)."""
    from leantrain.federated.simulator import seed_for

    steps, batch_size = sim.local.steps, sim.local.batch_size
    parts = sim.client_data.parts
    width = min(batch_size, max(len(parts[c]) for c in cids))
    rows = np.empty((len(cids), steps, width), dtype=np.int64)
    counts = np.empty((len(cids), steps), dtype=np.int64)
    for i, cid in enumerate(cids):
        idx = parts[cid].numpy()
        pos, cnt = batch_positions(len(idx), batch_size, seed_for(sim.seed, r, cid), steps)
        rows[i, :, : pos.shape[1]] = idx[pos]
        if pos.shape[1] < width:
            rows[i, :, pos.shape[1] :] = rows[i, :, :1]
        counts[i] = cnt
    return torch.from_numpy(rows), torch.from_numpy(counts)


# ---------------------------------------------------------------------------------------------- the batched step


def _step_fn(model: nn.Module):
    """vmap over clients of (gradient, loss) of the masked mean cross-entropy of one batch."""
    from torch.func import functional_call, grad_and_value, vmap

    def loss(params, x, y, mask, count):
        logits = functional_call(model, params, (x,))
        return (F.cross_entropy(logits, y, reduction="none") * mask).sum() / count

    return vmap(grad_and_value(loss))


class _Group:
    """One vectorised group of clients: stacked parameters, momentum buffers, per-client progress."""

    def __init__(self, sim: Any, r: int, cids: list[int], instructions: dict, limits: list[int]):
        self.cids = cids
        names = [n for n, _ in sim.model.named_parameters()]
        self.params: dict[str, torch.Tensor] = {}
        for name in names:
            first = instructions[cids[0]].arrays[name]
            if all(instructions[c].arrays[name] is first for c in cids):
                self.params[name] = first.detach().unsqueeze(0).expand(len(cids), *first.shape).clone()
            else:
                self.params[name] = torch.stack([instructions[c].arrays[name].detach() for c in cids])
        self.bufs: dict[str, torch.Tensor] = {}
        self.rows, self.counts = cohort_batches(sim, r, cids)
        self.limits = torch.tensor(limits)
        self.alive = torch.ones(len(cids), dtype=torch.bool)
        self.why: list[str | None] = [None] * len(cids)
        self.total = torch.zeros(len(cids), dtype=torch.float64)
        self.samples = torch.zeros(len(cids), dtype=torch.int64)


def _train_group(sim: Any, g: _Group, step_fn) -> None:
    local = sim.local
    x_all, y_all = sim.client_data.arrays["x"], sim.client_data.arrays["labels"]
    width = g.rows.shape[2]
    offsets = torch.arange(width)
    dtype = next(iter(g.params.values())).dtype
    crashed = g.limits <= 0
    for i in crashed.nonzero().flatten().tolist():
        g.why[i] = FAILURE_REASON
    g.alive &= ~crashed
    for s in range(local.steps):
        if s > 0:
            crashed = g.alive & (g.limits <= s)
            for i in crashed.nonzero().flatten().tolist():
                g.why[i] = FAILURE_REASON
            g.alive &= ~crashed
        if not bool(g.alive.any()):
            break
        rows, count = g.rows[:, s], g.counts[:, s]
        mask = (offsets[None, :] < count[:, None]).to(dtype)
        grads, loss = step_fn(g.params, x_all[rows], y_all[rows], mask, count.to(mask.dtype))
        finite = torch.isfinite(loss)
        bad = g.alive & ~finite
        for i in bad.nonzero().flatten().tolist():
            g.why[i] = f"FloatingPointError: local loss is {loss[i].item()}"
        g.alive &= finite
        step = g.alive
        everyone = bool(step.all())
        for name, p in g.params.items():
            d = grads[name]
            if local.weight_decay != 0:
                d = d.add(p, alpha=local.weight_decay)
            if local.momentum != 0:
                buf = g.bufs.get(name)
                buf = d.clone() if buf is None else buf.mul(local.momentum).add_(d)
                if not everyone and name in g.bufs:
                    buf = torch.where(_bcast(step, buf), buf, g.bufs[name])
                g.bufs[name] = buf
                d = buf
            new = p.add(d, alpha=-local.lr)
            g.params[name] = new if everyone else torch.where(_bcast(step, new), new, p)
        g.total += torch.where(step, loss.double() * count.double(), 0.0)
        g.samples += torch.where(step, count, 0)


def _bcast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


def group_size(model: nn.Module, sim: Any) -> int:
    """Clients per vectorised group: as many as fit :data:`MEMORY_BUDGET` (parameters, gradients, momentum and the
    step's new values, plus the step's inputs)."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = sim.client_data.arrays["x"]
    x_bytes = sim.local.batch_size * (x[0].numel() * max(x.element_size(), 4))
    return max(1, MEMORY_BUDGET // (4 * param_bytes + 4 * x_bytes))


def train_vectorised(sim: Any, r: int, cohort: list[int], instructions: dict, group: int | None = None,
                     failures: list[str] | None = None) -> Iterator[ClientOutcome]:  # fmt: skip
    """The cohort's outcomes, trained ``group`` clients at a time (default :func:`group_size`), in cohort order.

    A group whose vectorised training raises (a model torch.func cannot vectorise) is trained client by client
    through :meth:`Simulator.train_one` instead; the error is appended to ``failures``."""
    faults = {cid: sim.client_fault(r, cid) for cid in cohort}
    trained = [cid for cid in cohort if not faults[cid][0]]
    size = group or group_size(sim.model, sim)
    step_fn = _step_fn(sim.model)
    sim.model.train()
    position = {cid: i for i, cid in enumerate(cohort)}
    outcomes: dict[int, ClientOutcome] = {}
    emitted, last = 0, None
    for start in range(0, len(trained), size):
        cids = trained[start : start + size]
        limits = [sim.local.steps if faults[c][1] is None else faults[c][1] for c in cids]
        try:
            g = _Group(sim, r, cids, instructions, limits)
            _train_group(sim, g, step_fn)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - e.g. a forward torch.func cannot vectorise: train these one by one
            if failures is not None:
                failures.append(f"{type(err).__name__}: {err}")
            for cid in cids:
                outcomes[cid] = sim.train_one(r, cid, instructions[cid])
            last = None  # train_one left the working model and the RNG as they should be
        else:
            last = (g, len(cids) - 1)
            for i, cid in enumerate(cids):
                outcomes[cid] = _outcome(sim, r, cid, g, i, instructions[cid])
        upto = position[cids[-1]] + 1
        for cid in cohort[emitted:upto]:  # in cohort order, as soon as known
            yield outcomes.pop(cid) if cid in outcomes else ClientOutcome(cid, why=DROPPED)
        emitted = upto
    for cid in cohort[emitted:]:
        yield ClientOutcome(cid, why=DROPPED)
    if last is not None:  # leave the working model and the global RNG as the sequential engine does
        from leantrain.federated.simulator import seed_for, seed_torch

        g, i = last
        with torch.no_grad():
            for name, p in sim.model.named_parameters():
                p.copy_(g.params[name][i])
        seed_torch(seed_for(sim.seed, r, g.cids[i], 1))


def _outcome(sim: Any, r: int, cid: int, g: _Group, i: int, instruction) -> ClientOutcome:
    if g.why[i] is not None:
        return ClientOutcome(cid, why=g.why[i])
    samples = int(g.samples[i])
    metrics = {"loss": float(g.total[i]) / max(samples, 1), "samples": samples,
               "num_examples": sim.client_data.num_samples(cid)}  # fmt: skip
    reply = Reply({k: g.params[k][i].clone() for k in instruction.arrays}, metrics)
    return ClientOutcome(cid, sim.tamper(r, cid, reply), state=dict(sim.client_states.get(cid, {})))


# ---------------------------------------------------------------------------------------------- the engines


def model_key(model: nn.Module) -> tuple:
    """A model's architecture: its class, its modules and its parameters' names, shapes and dtypes."""
    arch = tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters())
    return (type(model).__qualname__, repr(model), arch)


class VmapEngine(Engine):
    """Vectorises every cohort it can (see the module doc); the rest through :meth:`Simulator.train_one`.

    ``group``: clients per vectorised group (default: as many as fit :data:`MEMORY_BUDGET`). A model whose
    vectorised training raises is trained sequentially from then on (the error is shown by :meth:`describe`).
    """

    name = "vmap"

    def __init__(self, group: int | None = None):
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
            raise TypeError(f"group={group!r} must be an integer >= 1")
        self.group = group
        self.broken: dict[tuple, str] = {}  # model_key -> why vectorised training failed
        self.choice = f"{self.name} (no round trained yet)"

    def describe(self) -> str:
        return self.choice

    def unsupported(self, sim, cohort, instructions) -> str | None:
        """Why this cohort is trained sequentially (None: it can be vectorised)."""
        why = cohort_unsupported(sim, cohort, instructions)
        if why is None and model_key(sim.model) in self.broken:
            why = f"vmap failed: {self.broken[model_key(sim.model)]}"
        return why

    def train(self, sim, round_idx, cohort, instructions) -> Iterator[ClientOutcome]:
        why = self.unsupported(sim, cohort, instructions)
        if why is not None:
            yield from self._sequential(sim, round_idx, cohort, instructions, why)
            return
        self.choice = vectorised_label(len(cohort), self.group or group_size(sim.model, sim))
        yield from self._vectorised(sim, round_idx, cohort, instructions)

    def _vectorised(self, sim, round_idx, cohort, instructions) -> Iterator[ClientOutcome]:
        failures: list[str] = []
        yield from train_vectorised(sim, round_idx, cohort, instructions, self.group, failures)
        if failures:
            self.broken[model_key(sim.model)] = failures[0]
            self.choice = f"sequential (vmap failed: {failures[0]})"

    def _sequential(self, sim, round_idx, cohort, instructions, why: str) -> Iterator[ClientOutcome]:
        self.choice = f"sequential ({why})"
        for cid in cohort:
            yield sim.train_one(round_idx, cid, instructions[cid])


def vectorised_label(clients: int, group: int) -> str:
    if clients <= group:
        return f"vmap ({clients} clients together)"
    return f"vmap ({clients} clients in {math.ceil(clients / group)} groups of up to {group})"


class AutoEngine(VmapEngine):
    """Vectorises where it is supported and measured faster than sequential training; sequential otherwise.

    The measurement is the real work of a round: the first round of each (model architecture, cohort size, batch
    width, input shape) trains its first few clients (a fifth of the cohort, 1 to 8) one after another through
    :meth:`Simulator.train_one` and the rest vectorised, timing both per trained client (everything each engine does
    for a client: loading the arrays, drawing the batches, the steps, the reply); later rounds with that key use
    the faster engine (cached for the engine's lifetime). Measuring costs no extra training, and results never
    depend on the choice. Cohorts of fewer than 3 clients are trained sequentially (little to vectorise), and so
    are models with layers outside :data:`EXACT_LAYERS` (convolutions, pooling, custom layers).
    """

    name = "auto"

    def __init__(self, group: int | None = None):
        super().__init__(group)
        self.measured: dict[tuple, tuple[float, float]] = {}  # key -> (vmap s per client, sequential s per client)

    @staticmethod
    def key(sim: Any, clients: int) -> tuple:
        """What a measurement holds for: the model's architecture, the cohort size, the batch width, the inputs."""
        x = sim.client_data.arrays["x"]
        width = min(sim.local.batch_size, max(len(p) for p in sim.client_data.parts))
        return (*model_key(sim.model), clients, width, tuple(x.shape[1:]), x.dtype)

    def train(self, sim, round_idx, cohort, instructions) -> Iterator[ClientOutcome]:
        why = self.unsupported(sim, cohort, instructions)
        if why is None and inexact_layers(sim.model):
            why = f"vmap reproduces linear layers and activations exactly, not {', '.join(inexact_layers(sim.model))}"
        if why is None and len(cohort) < 3:
            why = f"{len(cohort)} clients"
        if why is not None:
            yield from self._sequential(sim, round_idx, cohort, instructions, why)
            return
        key = self.key(sim, len(cohort))
        if key not in self.measured:
            yield from self._measure(sim, round_idx, cohort, instructions, key)
            return
        vec, seq = self.measured[key]
        if vec < seq:
            size = self.group or group_size(sim.model, sim)
            self.choice = vectorised_label(len(cohort), size)[:-1] + f"; measured {seq / vec:.1f}x faster)"
            yield from self._vectorised(sim, round_idx, cohort, instructions)
        else:
            why = f"vmap measured {seq / vec:.2f}x as fast for {len(cohort)} clients"
            yield from self._sequential(sim, round_idx, cohort, instructions, why)

    def _measure(self, sim, round_idx, cohort, instructions, key) -> Iterator[ClientOutcome]:
        k = max(1, min(8, len(cohort) // 5))
        head, tail = cohort[:k], cohort[k:]
        _warm_up(sim)
        started = time.perf_counter()
        first = [sim.train_one(round_idx, cid, instructions[cid]) for cid in head]
        seq_s = time.perf_counter() - started
        started = time.perf_counter()
        rest = list(self._vectorised(sim, round_idx, tail, instructions))
        vec_s = time.perf_counter() - started
        seq_n = sum(out.why != DROPPED for out in first)
        vec_n = sum(out.why != DROPPED for out in rest)
        label = f"{k} sequential, then {vectorised_label(len(tail), self.group or group_size(sim.model, sim))}"
        if model_key(sim.model) in self.broken:
            label = self.choice
        elif seq_n and vec_n:
            vec, seq = vec_s / vec_n, seq_s / seq_n
            self.measured[key] = (vec, seq)
            label = f"{label[:-1]}; measuring: vmap {seq / vec:.2f}x as fast)"
        self.choice = label
        yield from first
        yield from rest


def _warm_up(sim: Any) -> None:
    """One tiny vectorised step on the working model's values (torch.func's first call is slower than later ones);
    the model, the data and the RNG are untouched."""
    x, y = sim.client_data.arrays["x"][:1], sim.client_data.arrays["labels"][:1]
    params = {n: p.detach().unsqueeze(0) for n, p in sim.model.named_parameters()}
    ones = torch.ones(1, 1, dtype=next(iter(params.values())).dtype)
    try:
        _step_fn(sim.model)(params, x[None], y[None], ones, ones[:, 0])
    except Exception:  # noqa: BLE001, S110 - a model torch.func cannot vectorise fails (and is handled) in training
        pass
