"""Prefix replay: a second forward pass that starts where the first one's results stop being valid.

SAM-style optimizers evaluate the same batch twice. When only a few layers are perturbed (LW-SAM), everything the
network computed *before* the earliest perturbed layer is unchanged in the second pass, so recomputing it is waste.
:class:`PrefixReplay` records, during the first pass, every module call: when it started and ended (one clock per
forward of the root model) and its output (a detached view, no copy). :meth:`PrefixReplay.arm` then marks as
*replayable* each module whose every call ended before the first call of a perturbed module and whose outputs were
not modified in place afterwards, and replaces the ``forward`` of the outermost replayable calls with a stub that
returns the recorded output. The second pass then runs only the suffix of the network, through ordinary module
boundaries: ``nn.Sequential`` stages, residual blocks (a replayed block's output already contains its shortcut),
transformer layers. Code between modules (functional ops in a parent's ``forward``) still runs; it is cheap.

Where it cannot apply, it silently does nothing and the caller's full second pass runs (the results are the same,
only slower):

- the earliest perturbed module is the first module called (nothing before it to replay);
- a module called both before and after that point (a shared activation module, tied weights) is not replayed,
  nor is a module whose output was modified in place later (``ReLU(inplace=True)``); their parents may still be;
- a second-pass forward whose inputs differ from every recorded first-pass forward (other tensors, or the same
  tensor modified in place), whose inputs require gradients, or that runs in eval mode, runs in full;
- a perturbed weight whose holding module is not called in the forward (it is used functionally) replays nothing;
  a weight tied between modules makes every holder a boundary;
- a module output that is not a plain tree of tensors and scalars (an object that may hide tensors) is not
  replayed.

Not detected: a perturbed weight read functionally by a module that does not hold it, *before* its holder is
called (e.g. ``F.linear(x, other_module.weight)`` early in the network). Use ``second_pass="masked"`` for such a
model. Forward hooks registered by users run again on replayed outputs, as on a re-run (ours run first).

Semantics: outputs are replayed exactly, so the second pass gives bit-identical results to a full re-run for
deterministic modules. Randomness in the replayed prefix (dropout) is *reused* from the first pass rather than
re-drawn; a re-run would draw new masks there. Running statistics of replayed norm layers are not updated a second
time (they are not called).

Forwards are recorded only in training mode with gradients enabled (evaluation is ignored, even with gradients
on); at most ``max_forwards`` recent forwards are kept (micro-batches of one accumulated step), and every record
is dropped at the end of each step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from leantrain.errors import LeantrainError


@dataclass
class _Call:
    module: int  # index into PrefixReplay.modules
    start: int
    parent: _Call | None
    end: int = -1  # -1: still running (or its forward raised)
    output: Any = None
    versions: tuple[int, ...] = ()


@dataclass
class _Forward:
    inputs: list[Any]  # flattened (args, kwargs) of the root call
    versions: tuple[int, ...]
    calls: list[_Call] = field(default_factory=list)
    clock: int = 0
    stack: list[_Call] = field(default_factory=list)
    replay: dict[int, deque] = field(default_factory=dict)  # module index -> outputs of its replayed calls, in order


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


_PLAIN = (torch.Tensor, type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.Size)


def _replayable_output(tree: Any) -> bool:
    """True when every leaf is a tensor or a plain value: then the whole output can be detached and versioned."""
    return all(isinstance(leaf, _PLAIN) for leaf in tree_flatten(tree)[0])


def _detach(tree: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


class PrefixReplay:
    """Record module calls of ``model``'s forwards and replay the prefix before given modules on the next ones.

    Usage (what LW-SAM does): forward/backward as usual (recorded), ``arm(perturbed_modules)`` after the first
    pass, the second forward/backward (its prefix replayed), ``disarm()``. ``close()`` removes the hooks.
    """

    def __init__(self, model: nn.Module, max_forwards: int = 64):
        self.root = model
        self.modules = list(model.modules())
        self._index = {id(m): i for i, m in enumerate(self.modules)}
        self.max_forwards = max_forwards
        self.forwards: deque[_Forward] = deque(maxlen=max_forwards)
        self.armed = False
        self.replayed_modules: list[str] = []  # names of the stubbed modules (diagnostic)
        self.stats = {"replayed_forwards": 0, "full_forwards": 0}
        self._current: _Forward | None = None  # the first-pass forward being recorded, or the one being replayed
        self._cursor = 0
        self._stubs: dict[int, Any] = {}  # module index -> the instance-level forward it had (or None)
        # prepended: the recorded output is the module's own, before any user hook changes it (those run again on
        # the replayed output, as they would on a re-run)
        self._handles = [model.register_forward_pre_hook(self._root_pre, with_kwargs=True, prepend=True),
                         model.register_forward_hook(self._root_post, prepend=True)]  # fmt: skip
        for i, module in enumerate(self.modules[1:], start=1):
            self._handles.append(module.register_forward_pre_hook(self._pre(i), prepend=True))
            self._handles.append(module.register_forward_hook(self._post(i), prepend=True))

    # ------------------------------------------------------------ recording (first pass)

    def _root_pre(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._current is not None and self._current.stack:
            return  # a re-entrant call of the root inside its own forward: part of the current forward
        inputs = tree_flatten((args, kwargs))[0]
        versions = tuple(t._version for t in inputs if isinstance(t, torch.Tensor))
        if self.armed:
            wants_input_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
            self._current = None if wants_input_grad or not self.root.training else self._match(inputs, versions)
            self.stats["replayed_forwards" if self._current is not None else "full_forwards"] += 1
            return
        if not torch.is_grad_enabled() or not self.root.training:
            self._current = None  # evaluation (even with gradients on) is never a first pass to replay
            return
        self._current = _Forward(inputs, versions)
        self.forwards.append(self._current)
        self._pre(0)(_module, args)

    def _root_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._current is not None and not self.armed:
            self._post(0)(module, args, output)
            if self._current.stack:
                return  # the re-entrant root call ended; the outer one is still running
        self._current = None

    def _pre(self, index: int):
        def hook(_module: nn.Module, _args: tuple) -> None:
            fwd = self._current
            if fwd is None or self.armed:
                return
            fwd.clock += 1
            call = _Call(index, fwd.clock, fwd.stack[-1] if fwd.stack else None)
            fwd.calls.append(call)
            fwd.stack.append(call)

        return hook

    def _post(self, index: int):
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            fwd = self._current
            if fwd is None or self.armed or not fwd.stack or fwd.stack[-1].module != index:
                return
            call = fwd.stack.pop()
            fwd.clock += 1
            if not _replayable_output(output):
                return  # end stays -1: never replayed (an object that may hide tensors we cannot detach)
            call.end = fwd.clock
            call.output = _detach(output)
            call.versions = tuple(t._version for t in _tensors(output))

        return hook

    # ------------------------------------------------------------ replay (second pass)

    def arm(self, perturbed: list[torch.Tensor]) -> int:
        """Stub the outermost modules that finish before the first call of a module holding a ``perturbed`` tensor.

        A module holds a tensor when it is one of its own parameters (``parameters(recurse=False)``), so a weight
        tied between several modules makes each of them a boundary. A forward in which some holder is not called
        (its tensor is used functionally elsewhere) replays nothing. Returns how many modules were stubbed
        (0: nothing to replay, the second pass runs in full).
        """
        if self.armed:
            raise LeantrainError("PrefixReplay.arm was called twice without disarm in between")
        wanted = {id(t) for t in perturbed}
        targets = {i for i, m in enumerate(self.modules) if any(id(p) in wanted for p in m.parameters(recurse=False))}
        forwards = [f for f in self.forwards if not f.stack]  # a forward that raised is not replayable
        replayable: set[int] = set()
        banned: set[int] = {0}
        for fwd in forwards:
            starts = [c.start for c in fwd.calls if c.module in targets]
            # a holder never called: its tensor is used functionally somewhere, maybe early; replay nothing
            boundary = min(starts) if targets <= {c.module for c in fwd.calls} else 0
            for call in fwd.calls:
                done = 0 < call.end < boundary and call.versions == tuple(t._version for t in _tensors(call.output))
                (replayable if done else banned).add(call.module)
        replayable -= banned
        stubbed: set[int] = set()
        for fwd in forwards:
            fwd.replay = {}
            for call in fwd.calls:
                if call.module in replayable and not self._inside_replayed(call.parent, replayable):
                    fwd.replay.setdefault(call.module, deque()).append(call.output)
                    stubbed.add(call.module)
                call.output = None  # only the replayed outputs are kept
        self.armed = True
        self._cursor = 0
        for index in sorted(stubbed):
            self._stub(index)
        names = {id(m): n for n, m in self.root.named_modules()}
        self.replayed_modules = [names.get(id(self.modules[i]), "?") for i in sorted(stubbed)]
        return len(stubbed)

    @staticmethod
    def _inside_replayed(call: _Call | None, replayable: set[int]) -> bool:
        while call is not None:
            if call.module in replayable:
                return True
            call = call.parent
        return False

    def _stub(self, index: int) -> None:
        module = self.modules[index]
        self._stubs[index] = module.__dict__.get("forward")
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            fwd = self._current
            if fwd is None:
                return original(*args, **kwargs)  # a forward that matched no record: run it
            outputs = fwd.replay.get(index)
            if not outputs:
                raise LeantrainError(
                    f"second pass called module {self._name(index)!r} more often than the "
                    "first pass did on the same inputs; the model's forward is not deterministic in its structure, "
                    "use second_pass='masked'"
                )
            return outputs.popleft()

        module.forward = forward

    def _name(self, index: int) -> str:
        for name, m in self.root.named_modules():
            if m is self.modules[index]:
                return name
        return "?"

    def _match(self, inputs: list[Any], versions: tuple[int, ...]) -> _Forward | None:
        """The first recorded forward at or after the cursor whose root inputs equal these (else None: run in full)."""
        records = list(self.forwards)
        for k in range(self._cursor, len(records)):
            fwd = records[k]
            if not fwd.stack and self._same(fwd, inputs, versions):
                self._cursor = k + 1
                return fwd
        return None

    @staticmethod
    def _same(fwd: _Forward, inputs: list[Any], versions: tuple[int, ...]) -> bool:
        if len(fwd.inputs) != len(inputs):
            return False
        for a, b in zip(fwd.inputs, inputs, strict=True):
            if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
                return False
            if isinstance(a, torch.Tensor):
                if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                    return False
                if a is not b and not torch.equal(a, b):
                    return False
            elif a is not b and a != b:
                return False
        # the same tensor object modified in place since the first pass is different input
        return all(not (a is b and va != vb) for a, b, va, vb in _paired_versions(fwd, inputs, versions))

    def disarm(self) -> None:
        """Remove the stubs and forget every recorded forward (call at the end of each step)."""
        for index, previous in self._stubs.items():
            module = self.modules[index]
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._stubs.clear()
        self.forwards.clear()
        self._current = None
        self.armed = False

    def close(self) -> None:
        """Disarm and remove every hook from the model."""
        self.disarm()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _paired_versions(fwd: _Forward, inputs: list[Any], versions: tuple[int, ...]):
    recorded = [t for t in fwd.inputs if isinstance(t, torch.Tensor)]
    current = [t for t in inputs if isinstance(t, torch.Tensor)]
    return zip(recorded, current, fwd.versions, versions, strict=True)
