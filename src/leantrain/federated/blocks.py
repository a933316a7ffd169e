"""A model as a chain of trainable blocks, input to output, with what each block costs: the unit EmbracingFL and
TimelyFL train suffixes of.

:func:`model_blocks` orders the model into blocks: nn.Sequential / nn.ModuleList containers are opened, any other
module with parameters is one block (so a residual block is never split), normalization layers and parameter-free
modules join the block before them. :func:`ordered_blocks` runs one forward pass on a batch of 2 and re-orders the
blocks by their first call, filling in each block's multiply-accumulates, the storages autograd saves for backward
(``saved_tensors_hooks``) and the largest input + output of one of its layers run without grad. :func:`suffix_work`
is the fraction of a full forward + backward that training blocks ``cut``.. costs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leantrain.errors import ConfigError

_CONTAINERS = (nn.Sequential, nn.ModuleList)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
PROBE_BATCH = 2  # BatchNorm needs more than one row in train mode


@dataclass
class Block:
    """One trainable unit of the input-to-output order: its modules and the state-dict entries they own."""

    index: int  # position from the input side
    modules: list[str]  # qualified module names ("" is the root)
    tensors: list[str]  # state-dict names (parameters and buffers)
    params: int = 0  # trainable parameters
    macs: int = 0  # multiply-accumulates of one sample's forward (layers with weights)
    saved: dict[int, int] | None = None  # storage id -> bytes autograd keeps for backward (probe batch)
    transient: int = 0  # largest input + output bytes of one of its layers run without grad (probe batch)

    @property
    def activation_bytes(self) -> int:
        """Bytes this block saves for backward per sample (its distinct storages)."""
        return sum((self.saved or {}).values()) // PROBE_BATCH


def _units(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    def walk(module: nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
        if isinstance(module, _CONTAINERS):
            for child_name, child in module.named_children():
                yield from walk(child, f"{name}.{child_name}" if name else child_name)
        else:
            yield name, module

    if isinstance(model, _CONTAINERS) or not any(True for _ in model.children()):
        yield from walk(model, "")
    else:
        for child_name, child in model.named_children():
            yield from walk(child, child_name)


def model_blocks(model: nn.Module) -> list[Block]:
    """The model's blocks in registration order (see the module docstring; :func:`ordered_blocks` re-orders them
    by forward call order)."""
    groups: list[list[tuple[str, nn.Module]]] = []
    pending: list[tuple[str, nn.Module]] = []  # parameter-free modules before the first block
    for name, module in _units(model):
        has_params = any(True for _ in module.parameters())
        if has_params and (not groups or not isinstance(module, _NORMS)):
            groups.append(pending + [(name, module)])
            pending = []
        elif groups:
            groups[-1].append((name, module))
        else:
            pending.append((name, module))
    if not groups:
        raise ConfigError("the model has no parameters to train")
    owner = {name: i for i, group in enumerate(groups) for name, _ in group}
    tensors: list[list[str]] = [[] for _ in groups]
    for key in model.state_dict():
        parts = key.split(".")
        found = next((owner[m] for i in range(len(parts) - 1, -1, -1) if (m := ".".join(parts[:i])) in owner), 0)
        tensors[found].append(key)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    return [Block(i, [n for n, _ in g], tensors[i], sum(trainable.get(t, 0) for t in tensors[i]))
            for i, g in enumerate(groups)]  # fmt: skip


def example_input(model: nn.Module, input_shape: tuple[int, ...] | None) -> torch.Tensor:
    first = next(m for _, m in _units(model) if any(True for _ in m.parameters()))
    if isinstance(first, nn.Embedding):  # token ids
        return torch.ones(PROBE_BATCH, *(input_shape or (16,)), dtype=torch.long)
    if input_shape is None:
        input_shape = getattr(getattr(model, "config", None), "input_shape", None)
    if input_shape is None and isinstance(first, nn.Linear):
        input_shape = (first.in_features,)
    if input_shape is None:
        raise ConfigError("cannot infer the model's input shape to probe its blocks; pass input_shape=(C, H, W) "
                          "(per sample)")  # fmt: skip
    return torch.zeros(PROBE_BATCH, *input_shape)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in a module's inputs or outputs (nested tuples, lists, dicts; PackedSequence is a tuple)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, tuple | list):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def probe_blocks(model: nn.Module, blocks: list[Block], example: torch.Tensor) -> list[int]:
    """Fill each block's saved storages and MACs from one forward pass; return the blocks' first-call order."""
    modules = dict(model.named_modules())
    own = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    current: list[int | None] = [None]
    first_call: dict[int, int] = {}
    for b in blocks:
        b.saved, b.macs, b.transient = {}, 0, 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        if current[0] is not None:
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensors without a plain storage (sparse, nested, ...)
                return t
            if storage.data_ptr() not in own:
                blocks[current[0]].saved[storage.data_ptr()] = storage.nbytes()
        return t

    def enter(i: int):
        def hook(module, args):
            current[0] = i
            first_call.setdefault(i, len(first_call))

        return hook

    def count(i: int):  # on every layer (leaf module): its MACs, and its no-grad footprint (input + output)
        def hook(module, args, out):
            outs, ins = list(_tensors(out)), list(_tensors(args))
            blocks[i].transient = max(blocks[i].transient, sum(t.numel() * t.element_size() for t in ins + outs))
            weights = sum(p.numel() for p in module.parameters(recurse=False))
            if not weights or isinstance(module, nn.Embedding) or not outs or outs[0].ndim < 2:
                return
            y = outs[0]  # (B, C, *spatial) for conv and norm layers, (B, ..., features) or (tokens, features) else
            channel = y.shape[1] if isinstance(module, (nn.modules.conv._ConvNd, *_NORMS)) else y.shape[-1]
            blocks[i].macs += weights * max(1, y.numel() // (example.shape[0] * channel))  # weights x positions

        return hook

    handles = []
    for b in blocks:
        for name in b.modules:
            handles.append(modules[name].register_forward_pre_hook(enter(b.index)))
            handles.append(modules[name].register_forward_hook(lambda *_: current.__setitem__(0, None)))
            for leaf in modules[name].modules():
                if not any(True for _ in leaf.children()):
                    handles.append(leaf.register_forward_hook(count(b.index)))
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            model.train()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(example)
            del out
    finally:
        for h in handles:
            h.remove()
        model.load_state_dict(snapshot)
        for m, mode in modes.items():
            m.training = mode
    return sorted(range(len(blocks)), key=lambda i: (first_call.get(i, len(blocks)), i))


def ordered_blocks(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[Block]:
    """The model's blocks in forward-call order, probed (MACs, saved activations, transients), indexed 0..n-1."""
    blocks = model_blocks(model)
    order = probe_blocks(model, blocks, example_input(model, input_shape))
    ordered = [blocks[i] for i in order]
    for i, b in enumerate(ordered):
        b.index = i
    return ordered


def suffix_work(blocks: list[Block], cut: int) -> float:
    """Fraction of a full forward + backward that training blocks ``cut``.. costs: (F + 2·F_s) / 3F, with F the
    multiply-accumulates of a full forward and F_s the trained suffix's (parameter counts when no MACs were
    measured)."""
    if cut == 0:
        return 1.0
    cost = [b.macs for b in blocks]
    if not sum(cost):
        cost = [b.params for b in blocks]
    total, suffix = sum(cost), sum(cost[cut:])
    return (total + 2 * suffix) / (3 * total) if total else 1.0


def forward_macs(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> int:
    """Multiply-accumulates of one sample's forward pass through the layers with weights."""
    return sum(b.macs for b in ordered_blocks(model, input_shape))


class FrozenPrefix(nn.Module):
    """The working model with the modules of ``prefix`` (blocks) kept in eval mode while training: BatchNorm there
    normalizes with, and does not update, its running statistics; dropout is off (``local_sgd`` calls
    ``model.train()``, which this overrides for the prefix)."""

    def __init__(self, model: nn.Module, prefix: list[Block]):
        super().__init__()
        self.model = model
        modules = dict(model.named_modules())
        self.frozen = [modules[m] for b in prefix for m in b.modules]  # a plain list: not registered again

    def train(self, mode: bool = True) -> FrozenPrefix:
        super().train(mode)
        for m in self.frozen:
            m.eval()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def suffix_tensors(blocks: list[Block], cut: int, names: Iterable[str]) -> list[str]:
    """The entries of ``names`` (in their order) that belong to blocks ``cut``.. (what a client with that cut trains
    and uploads)."""
    owned = {t for b in blocks[cut:] for t in b.tensors}
    return [k for k in names if k in owned]


def train_suffix(ctx: Any, blocks: list[Block], cut: int, steps: int) -> dict[str, float]:
    """``steps`` local SGD steps of ``ctx.model``'s blocks ``cut``.. (all of it for cut 0), the prefix frozen and in
    eval mode; ``ctx`` is the client's :class:`~leantrain.federated.algorithms.base.ClientContext`."""
    from leantrain.federated.client import local_sgd, trainable_only

    names = set(suffix_tensors(blocks, cut, dict(ctx.model.named_parameters())))
    trained = names if cut else None
    with trainable_only(ctx.model, trained):
        return local_sgd(FrozenPrefix(ctx.model, blocks[:cut]), ctx.loss_fn, ctx.batches, steps, ctx.local.lr,
                         ctx.local.momentum, ctx.local.weight_decay)  # fmt: skip
