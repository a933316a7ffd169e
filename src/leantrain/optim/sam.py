"""Sharpness-Aware Minimization (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021, arXiv 2010.01412) and its adaptive variant ASAM (Kwon et al., "ASAM: Adaptive
Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021, arXiv 2102.11600).

SAM minimizes the worst loss in a ρ-ball around the weights. Per step it takes the gradient g at w, moves to
the approximate worst point w + ε with ε = ρ·g/‖g‖₂ (the norm is global, over every parameter of every group),
takes the gradient there, returns to w and hands that second gradient to a base optimizer (SGD, AdamW, ...).
ASAM makes the ball scale-invariant with T_w = |w| (elementwise): ε = ρ·T_w²g/‖T_w g‖₂, and usually needs a
ρ about 10× larger than SAM's.

Deliberate departures and choices:

- ``step(closure)`` calls the closure *first* (the first gradient), as torch optimizers are expected to; the
  popular two-call wrappers instead expect the caller to have run backward already. leantrain's ``Trainer``
  relies on this: it hands over a closure and never runs a backward itself for ``requires_closure``
  optimizers. The two-call form (``first_step`` / ``second_step``) is still there for custom loops and is
  the path that works with ``torch.compile``.
- The original weights are stored as a copy and copied back, never recovered as ``w + ε − ε``, so
  ``second_step`` restores them bit-exactly.
- ``state_dict()`` is the base optimizer's state dict (its param groups are shared with SAM's and carry
  ``rho`` and ``adaptive``). The saved copy of the weights and ε are transient within one step and are not
  saved; ``state_dict()`` refuses to run between ``first_step`` and ``second_step``, where the model itself
  would be saved perturbed.
- The perturbation uses ρ/(‖g‖ + 1e-12) so an all-zero gradient gives ε = 0 rather than NaN.
- BatchNorm: the perturbed pass would update running statistics a second time; the paper's JAX code keeps
  the first pass's statistics. :func:`bn_stats_frozen` restores them exactly (buffers and
  ``num_batches_tracked``), which also works for ``momentum=None``, unlike setting momentum to 0.
- Mixed precision (the F-SAM recipe): ``first_step(grad_scaler=s)`` / ``second_step(grad_scaler=s)`` unscale
  each pass's gradient through the scaler's own bookkeeping, under two different optimizer objects that share
  the param groups: the ascent gradient as ``s.unscale_(sam)``, the descent gradient as
  ``s.step(sam.base_optimizer)``. So there is no "unscale_() has already been called", and ``s.update()``
  sees both passes' inf/NaN checks. An overflow in either pass skips the whole step (weights restored
  bit-exactly, base optimizer untouched) and the scale backs off. ``step(closure)`` takes no scaler (AsyncSAM
  shares its signature); AMP users call the two passes themselves or use
  :func:`~leantrain.optim.sam_step.sam_training_step`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from leantrain.errors import ConfigError, LeantrainError

_EPS = 1e-12  # keeps ρ/‖g‖ finite when the gradient is exactly zero


def _check_rho(rho: Any, where: str) -> None:
    if not isinstance(rho, int | float) or isinstance(rho, bool) or not rho > 0:
        raise ConfigError(f"SAM {where}rho={rho!r} is invalid; rho is the perturbation radius and must be > 0")


class SAM(torch.optim.Optimizer):
    """Wraps ``base_optimizer`` (a class) so each step descends with the gradient at the SAM-perturbed weights.

    ``rho`` and ``adaptive`` are defaults for every param group; a group may set its own. ``base_kwargs``
    (lr, momentum, weight_decay, ...) go to the base optimizer, which shares SAM's param groups, so LR
    schedules that edit ``optimizer.param_groups`` act on the base optimizer too.
    """

    requires_closure = True  # leantrain's Trainer then calls step(closure) instead of backward(); step()
    applies_first_gradient = False  # only the perturbed gradient reaches the base optimizer (see sam_step)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ):
        _check_rho(rho, "")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ConfigError(
                f"SAM base_optimizer={base_optimizer!r} is invalid; pass an optimizer class such as torch.optim.SGD"
            )
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        for i, group in enumerate(self.param_groups):
            _check_rho(group["rho"], f"param_groups[{i}].")
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups  # one list of groups for SAM, base and schedules
        self.defaults.update(self.base_optimizer.defaults)
        self.model = model  # optional: gives parameter names and the norm layers whose statistics to protect
        self._perturbed = False  # between first_step and second_step (the weights are at w + ε unless skipped)
        self._scaled = False  # first_step got a GradScaler; second_step must get one too
        self.last_step_skipped = False  # a GradScaler found inf/NaN gradients in either pass of the last step

    # ------------------------------------------------------------ the two passes

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        """‖T_w g‖₂ over all groups (T_w = |w| in adaptive groups, else 1), on the first parameter's device."""
        device = self.param_groups[0]["params"][0].device
        norms = [
            ((p.abs() * p.grad) if group["adaptive"] else p.grad).norm(p=2).to(device)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not norms:
            return torch.zeros((), device=device)
        return torch.linalg.vector_norm(torch.stack(norms), ord=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Move every parameter with a gradient to w + ε and remember w; needs the gradient at w in ``.grad``.

        With ``grad_scaler`` the gradient is the scaled one (``grad_scaler.scale(loss).backward()``); it is
        unscaled here and, if it holds inf/NaN, the weights are not moved and :meth:`second_step` skips the step.
        """
        if self._perturbed:
            raise LeantrainError("SAM.first_step was called twice without second_step in between")
        grad_scaler = _enabled(grad_scaler)
        if grad_scaler is None:
            self.last_step_skipped = False
        elif not self._unscale_ascent(grad_scaler):
            if zero_grad:
                self.zero_grad()
            return
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + _EPS)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["old_p"] = p.detach().clone()
                e_w = (p * p * p.grad if group["adaptive"] else p.grad) * scale.to(p.device)
                state["e_w"] = e_w
                p.add_(e_w)
        self._perturbed = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Restore the exact weights saved by ``first_step``, then let the base optimizer step with ``.grad``.

        Pass the ``grad_scaler`` given to :meth:`first_step`: the descent gradient is unscaled and checked, the
        base optimizer steps only if neither pass overflowed, and ``grad_scaler.update()`` is called.
        """
        if not self._perturbed:
            raise LeantrainError("SAM.second_step was called without first_step; call first_step first")
        grad_scaler = _enabled(grad_scaler)
        self._check_same_scaler(grad_scaler)
        self._restore()
        if grad_scaler is None:
            self.base_optimizer.step()
        else:
            if not self.last_step_skipped:
                # unscales the descent gradient (unless the caller already did, to clip it) and steps only if finite
                grad_scaler.step(self.base_optimizer)
                self.last_step_skipped = not _grads_finite(self.param_groups)
            grad_scaler.update()  # backs off when either recorded check (ascent under self, descent) found inf/NaN
        if zero_grad:
            self.zero_grad()

    def _check_same_scaler(self, grad_scaler: torch.amp.GradScaler | None) -> None:
        if (grad_scaler is not None) != self._scaled:
            raise LeantrainError(
                f"{type(self).__name__}.first_step and second_step must both get the same grad_scaler, or neither; "
                f"first_step got {'a' if self._scaled else 'no'} grad_scaler, second_step "
                f"{'a' if grad_scaler is not None else 'none'}"
            )

    @torch.no_grad()
    def _unscale_ascent(self, grad_scaler: torch.amp.GradScaler) -> bool:
        """Unscale the first-pass gradient in place; False (step skipped, nothing perturbed) if it overflowed.

        Recorded by the scaler under ``self``, not the base optimizer, so ``second_step`` can still unscale the
        descent gradient under the base optimizer and ``update()`` sees both checks.
        """
        grad_scaler.unscale_(self)
        self.last_step_skipped = not _grads_finite(self.param_groups)
        self._scaled = True
        if self.last_step_skipped:
            self._perturbed = True  # second_step restores nothing, skips the base step and updates the scale
        return not self.last_step_skipped

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One SAM step; ``closure`` must zero the grads, compute the loss, backward and return the loss.

        It runs twice: at w (the returned loss) and at the perturbed weights. Without a closure, ``step()``
        after ``first_step()`` is ``second_step()``: trainers that own the backward pass and then call
        ``optimizer.step()`` (the Hugging Face ``Trainer`` with :class:`SharpnessAwareTrainer`) work as is.
        """
        if closure is None and self._perturbed:
            self.second_step()
            return None  # type: ignore[return-value]
        if closure is None:
            raise LeantrainError(
                "SAM.step needs a closure that zeroes grads, computes the loss, calls backward and returns "
                "the loss, e.g. optimizer.step(closure); or call first_step() and second_step() yourself"
            )
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        try:
            with torch.enable_grad():
                closure()
        except BaseException:
            self._restore()  # do not leave the model at w + ε when the perturbed pass fails
            raise
        self.second_step()
        return loss

    @torch.no_grad()
    def _restore(self) -> None:
        """Copy the saved original weights back (bit-exact: a copy, not w + ε − ε)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "old_p" in state:
                    p.copy_(state.pop("old_p"))
        self._perturbed = False
        self._scaled = False

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict; its param groups carry ``rho`` and ``adaptive``."""
        if self._perturbed:
            raise LeantrainError(
                "SAM.state_dict was called between first_step and second_step, while the weights are "
                "perturbed; save after second_step"
            )
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # torch replaced the group dicts; share them again
        for i, group in enumerate(self.param_groups):
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("adaptive", self.defaults["adaptive"])
            _check_rho(group["rho"], f"param_groups[{i}].")
        self.state.clear()
        self._perturbed = False
        self._scaled = False
        self.last_step_skipped = False


def _enabled(grad_scaler: torch.amp.GradScaler | None) -> torch.amp.GradScaler | None:
    """The scaler, or None when it is disabled (``GradScaler(enabled=False)`` then behaves exactly like none)."""
    return grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None


def _grads_finite(param_groups: list[dict[str, Any]]) -> bool:
    """True when no gradient holds inf/NaN: the same elementwise check the GradScaler makes."""
    checks = [torch.isfinite(p.grad).all() for group in param_groups for p in group["params"] if p.grad is not None]
    if not checks:
        return True
    return bool(torch.stack([c.to(checks[0].device) for c in checks]).all())  # one host sync per pass


@contextlib.contextmanager
def bn_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Run the block, then put every norm layer's running statistics back exactly as they were.

    Wrap SAM's perturbed forward/backward with it so running statistics only see the unperturbed pass, as in
    the paper's code. Restores ``running_mean``, ``running_var`` and ``num_batches_tracked`` bit-exactly.
    """
    saved = []
    for module in model.modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            buffers = [module.running_mean, module.running_var, module.num_batches_tracked]
            saved.append([(b, b.detach().clone()) for b in buffers if b is not None])
    try:
        yield
    finally:
        with torch.no_grad():
            for pairs in saved:
                for buffer, copy in pairs:
                    buffer.copy_(copy)
