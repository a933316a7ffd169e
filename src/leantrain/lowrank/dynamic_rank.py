"""DRA's schedule: switch a model between low-rank, full-rank and adapter phases at epoch boundaries.

Dynamic Rank Adjustment (arXiv 2508.08625) trains the target layers as low-rank factors, *inflates* them to
dense full-rank weights for a window of epochs that straddles the first learning-rate decay (so full-rank
training happens in both the high- and the low-noise regime), then *deflates* back to a cheap trainable form.
The official code's ResNet-20 / CIFAR-10 schedule over 150 epochs is: epochs 0-54 low-rank, 55-119 full rank,
120-149 frozen dense weight plus a zero-initialised adapter (alpha = 16). :func:`official_events` scales those
switch points (55/150 and 120/150 of the run) to any number of epochs.

Use it as a callback of the leantrain loop (``Trainer(callbacks=[schedule])`` with an ``optimizer_factory``),
or as plain calls in any loop::

    schedule = DynamicRankSchedule(epochs=30, rank_ratio=0.5)
    for epoch in range(30):
        if schedule.apply(model, epoch):          # the phase changed: the parameters are new tensors
            optimizer = make_optimizer(model)     # fresh optimizer, momentum restarts (as the official code)
        train_one_epoch(model, optimizer)

Every switch preserves the function except a deflation by truncated SVD (``deflate="svd"``): inflation composes
the factors exactly, the adapter starts at zero, and merging an adapter folds it into the dense weight.

Deliberate departures and choices:

- The schedule is a list of ``(epoch, phase)`` events, so the paper's prose reading (several short full-rank
  bursts) is expressible; the default is the official code's one inflate and one deflate.
- ``deflate="svd"`` (a truncated SVD of the dense weight back to rank r) is offered because it is the reading
  of "deflate back to low rank" that keeps the cheap low-rank cost; it changes the function at the switch and
  is not the official method.
- The first low-rank phase starts from random factors (Glorot-uniform on each factor, Keras' default), as the
  official code trains low-rank from scratch (PyTorch's default init on both factors gives the composed weight
  about a third of a dense layer's variance, and a BatchNorm-free network then barely trains); ``init="svd"``
  starts from the truncated SVD of the dense weights instead (for a pretrained model). Later low-rank phases
  always come from the truncated SVD.
- BatchNorm statistics and untouched layers need no copying here: only the target modules are swapped in
  place; everything else is the same module throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.lowrank.adapter import LowRankAdapter
from leantrain.lowrank.factorized import (
    LayerSelector,
    LowRankConv2d,
    LowRankLinear,
    check_rank_ratio,
    layer_rank,
    replace_module,
    select_layers,
)

PHASES = ("lowrank", "full", "adapter")
# ResNet-20 / CIFAR-10 in the official code: switches at epochs 55 and 120 of 150.
OFFICIAL_SWITCHES = (55 / 150, 120 / 150)

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


def official_events(epochs: int, deflate: str = "adapter") -> list[tuple[int, str]]:
    """The official schedule scaled to ``epochs``: low-rank, full from 55/150, deflated from 120/150 of the run."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ConfigError(f"DynamicRankSchedule epochs={epochs!r} is invalid; it must be a positive integer")
    if deflate not in ("adapter", "svd"):
        raise ConfigError(f"DynamicRankSchedule deflate={deflate!r} is invalid; use 'adapter' or 'svd'")
    e1, e2 = (round(f * epochs) for f in OFFICIAL_SWITCHES)
    if not 0 < e1 < e2 < epochs:
        raise ConfigError(
            f"DynamicRankSchedule epochs={epochs} is too short for three phases (switches at {e1} and {e2}); "
            "use at least 3 epochs or pass events=[(0, 'lowrank'), (E1, 'full'), (E2, 'adapter')]"
        )
    return dra_events(e1, e2, deflate)


def dra_events(inflate: int, deflate_at: int, deflate: str = "adapter") -> list[tuple[int, str]]:
    """Low-rank from epoch 0, full rank from ``inflate``, deflated (adapter or truncated SVD) from ``deflate_at``."""
    return [(0, "lowrank"), (inflate, "full"), (deflate_at, "adapter" if deflate == "adapter" else "lowrank")]


def _check_events(events: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    out = []
    for item in events:
        if not (isinstance(item, Sequence) and len(item) == 2):
            raise ConfigError(f"DynamicRankSchedule event {item!r} is invalid; events are (epoch, phase) pairs")
        epoch, phase = item
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ConfigError(f"DynamicRankSchedule event epoch {epoch!r} must be an integer >= 0")
        if phase not in PHASES:
            raise ConfigError(f"DynamicRankSchedule phase {phase!r} is invalid; use one of {', '.join(PHASES)}")
        out.append((epoch, phase))
    if not out or out[0][0] != 0:
        raise ConfigError(f"DynamicRankSchedule events={list(events)!r} must start at epoch 0")
    if any(b[0] <= a[0] for a, b in zip(out, out[1:], strict=False)):
        raise ConfigError(f"DynamicRankSchedule events={list(events)!r} must have strictly increasing epochs")
    return out


def _phase_of(module: nn.Module) -> str:
    if isinstance(module, LowRankLinear | LowRankConv2d):
        return "lowrank"
    return "adapter" if isinstance(module, LowRankAdapter) else "full"


class DynamicRankSchedule:
    """Puts the target layers of a model into the phase its events name for each epoch.

    ``events``: ``[(epoch, phase), ...]`` with phases ``"lowrank"``, ``"full"``, ``"adapter"``, starting at
    epoch 0; or ``epochs=N`` for :func:`official_events` (with ``deflate``). ``rank_ratio`` and ``layers`` pick
    the targets and their rank as :func:`~leantrain.lowrank.factorize` does; ``alpha`` scales the adapter
    (alpha / r); ``init`` is how the first low-rank phase starts (``"random"`` or ``"svd"``).
    ``optimizer_factory(model)`` is needed only as a leantrain loop callback, which replaces
    ``trainer.optimizer`` after every switch.
    """

    def __init__(
        self,
        events: Sequence[tuple[int, str]] | None = None,
        *,
        epochs: int | None = None,
        deflate: str = "adapter",
        rank_ratio: float = 0.5,
        layers: LayerSelector | None = None,
        alpha: float = 16.0,
        init: str = "random",
        optimizer_factory: OptimizerFactory | None = None,
    ):
        if (events is None) == (epochs is None):
            raise ConfigError("DynamicRankSchedule needs exactly one of events=[(epoch, phase), ...] or epochs=N")
        self.events = _check_events(events) if events is not None else official_events(epochs, deflate)
        self.rank_ratio = check_rank_ratio(rank_ratio, "DynamicRankSchedule")
        if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
            raise ConfigError(f"DynamicRankSchedule alpha={alpha!r} is invalid; it must be > 0")
        if init not in ("random", "svd"):
            raise ConfigError(f"DynamicRankSchedule init={init!r} is invalid; use 'random' or 'svd'")
        self.layers, self.alpha, self.init = layers, float(alpha), init
        self.optimizer_factory = optimizer_factory
        self.ranks: dict[str, int] = {}  # target layer -> rank, fixed at the first apply
        self.phase: str | None = None
        self.switches: list[dict] = []  # {"epoch", "phase"} of every switch done

    def phase_at(self, epoch: int) -> str:
        """The phase the events name for ``epoch`` (the last event at or before it)."""
        return [phase for start, phase in self.events if start <= epoch][-1]

    @property
    def target_layers(self) -> list[str]:
        """Names of the swapped layers (known after the first :meth:`apply`)."""
        return list(self.ranks)

    def apply(self, model: nn.Module, epoch: int) -> str | None:
        """Bring ``model`` to ``phase_at(epoch)``; returns the phase on the first call and after a change, else None.

        When it returns a phase, the target layers may be new modules: (re)build the optimizer.
        """
        if not self.ranks:
            chosen = select_layers(model, self.layers, self.rank_ratio)
            if not chosen:
                raise ConfigError(
                    f"DynamicRankSchedule found no layer to factorize (rank_ratio={self.rank_ratio}, "
                    f"layers={self.layers!r})"
                )
            self.ranks = {name: layer_rank(mod, self.rank_ratio) for name, mod in chosen.items()}
        target = self.phase_at(epoch)
        changed = False
        for name, rank in self.ranks.items():
            module = model.get_submodule(name)
            if _phase_of(module) != target:
                replace_module(model, name, self._convert(module, target, rank))
                changed = True
        first = self.phase is None
        self.phase = target
        if changed:
            self.switches.append({"epoch": epoch, "phase": target})
        return target if changed or first else None

    def _convert(self, module: nn.Module, target: str, rank: int) -> nn.Module:
        fresh = _phase_of(module) == "full" and self.phase is None  # the run's first phase, from the dense init
        if isinstance(module, LowRankLinear | LowRankConv2d):
            dense = module.inflate()
        elif isinstance(module, LowRankAdapter):
            dense = module.merge()
        else:
            dense = module
        if target == "full":
            return dense
        if target == "adapter":
            return LowRankAdapter(dense, rank, self.alpha)
        cls = LowRankLinear if isinstance(dense, nn.Linear) else LowRankConv2d
        return cls.like(dense, rank) if fresh and self.init == "random" else cls.from_dense(dense, rank)

    # ------------------------------------------------------------ leantrain loop callback

    def on_train_begin(self, trainer) -> None:
        self._sync(trainer)

    def on_epoch_end(self, trainer) -> None:
        self._sync(trainer)  # trainer.state.epoch is already the next epoch

    def _sync(self, trainer) -> None:
        epoch = trainer.state.epoch
        if self.apply(trainer.model, epoch) is None:
            return
        if self.optimizer_factory is None:
            raise ConfigError("DynamicRankSchedule as a loop callback needs optimizer_factory=lambda model: ...")
        close = getattr(trainer.optimizer, "close", None)
        if callable(close):
            close()
        trainer.optimizer = self.optimizer_factory(trainer.model)
        for group in trainer.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.progress.message(f"DRA: epoch {epoch}: {self.phase} phase, {trainable:,} trainable parameters")
        if trainer.logger is not None:
            trainer.logger.log({"split": "phase", "step": trainer.state.step, "epoch": epoch, "phase": self.phase,
                                "trainable_params": trainable})  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"DynamicRankSchedule(events={self.events}, rank_ratio={self.rank_ratio}, alpha={self.alpha:g}, "
            f"init={self.init!r})"
        )
