"""Sharpness-Aware Minimization (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021, arXiv 2010.01412) and its adaptive variant ASAM (Kwon et al., "ASAM: Adaptive
Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021, arXiv 2102.11600).

SAM minimizes the worst loss in a ρ-ball around the weights. Per step it takes the gradient g at w, moves to
the approximate worst point w + ε with ε = ρ·g/‖g‖₂ (the norm is global, over every parameter of every group),
takes the gradient there, returns to w and hands that second gradient to a base optimizer (SGD, AdamW, ...).
ASAM makes the ball scale-invariant with a per-parameter operator T_w: ε = ρ·T_w²g/‖T_w g‖₂ (the norm again
global), and usually needs a ρ about 10× larger than SAM's. ``adaptive_form`` picks T_w:

- ``"official"`` (default), the official code (SamsungLabs/ASAM, ``asam.py``, ``ASAM.ascent_step``): T_w = |w| + η
  elementwise (``adaptive_eta`` = η, default 0.01, the class default there) on *weights*, the identity on every
  other parameter (biases), so a bias contributes g to the norm and ε_bias = ρ·g_bias/‖T_w g‖₂ as in SAM. The
  official code calls a parameter a weight when ``'weight' in name``; leantrain does the same whenever it knows
  the name: from ``model=`` (``model.named_parameters()``) or from named parameters given to the optimizer
  (``SAM(model.named_parameters(), ...)``, torch's ``param_names``). Without a name it decides by shape: a tensor
  with two or more dimensions (Linear/Conv/Embedding weights) is a weight, a vector or scalar is not. That
  agrees with the name rule except for normalization-layer gains (``bn.weight``, 1-D), which the official code
  scales and the shape rule leaves at the identity; pass ``model=`` to get the official rule exactly.
- ``"davda54"`` (davda54/sam's ``adaptive=True``, leantrain's rule before): T_w = |w| on every parameter, biases
  included, no η. Kept bit-exact for comparisons with runs made before.

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
- The perturbation uses ρ/(‖g‖ + 1e-12) so an all-zero gradient gives ε = 0 rather than NaN (the official ASAM
  code adds 1e-16).
- ASAM's η default: 0.01 is the official ``ASAM`` class's default; its example script ``example_cifar.py`` passes
  ``--eta`` whose default is 0.0, so the README's CIFAR commands ran with T_w = |w| on weights.
  ``adaptive_eta=0.0`` reproduces those runs.
- ASAM's T_w is computed by one function, :func:`asam_t_w`, with the per-parameter η from
  :meth:`SAM.asam_etas`; AsyncSAM's ascent (in process or on its worker) uses the same two, so the operator is
  defined once.
- BatchNorm: the perturbed pass would update running statistics a second time; the paper's JAX code keeps
  the first pass's statistics. :func:`bn_stats_frozen` restores them exactly (buffers and
  ``num_batches_tracked``), which also works for ``momentum=None``, unlike setting momentum to 0.
  ``step(closure)`` applies it to the perturbed pass when the optimizer got ``model=``; without a model it cannot
  find the norm layers, and both passes update the statistics (the two-call form: wrap the second pass yourself,
  or use :func:`~leantrain.optim.sam_step.sam_training_step`).
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


ADAPTIVE_FORMS = ("official", "davda54")  # ASAM's T_w: SamsungLabs/ASAM's, or davda54/sam's (see the docstring)


def _check_adaptive(form: Any, eta: Any) -> None:
    if form not in ADAPTIVE_FORMS:
        raise ConfigError(
            f"SAM adaptive_form={form!r} is invalid; accepted: 'official' (ASAM's code: T_w = |w| + eta on weights, "
            "identity on biases) or 'davda54' (T_w = |w| on every parameter)"
        )
    if not isinstance(eta, int | float) or isinstance(eta, bool) or not 0 <= eta < float("inf"):
        raise ConfigError(f"SAM adaptive_eta={eta!r} is invalid; expected a finite number >= 0 (official: 0.01)")


def asam_t_w(p: torch.Tensor, eta: float | None) -> torch.Tensor | None:
    """ASAM's operator T_w for one parameter: |w| + η elementwise, or None for the identity (T_w = 1).

    ``eta`` comes from :meth:`SAM.asam_etas`: η on weights and None on biases under the official rule, 0.0 on every
    parameter in the davda54 form (T_w = |w|), None in groups that are not adaptive.
    """
    if eta is None:
        return None
    t = p.detach().abs()
    return t.add_(eta) if eta else t


@torch.no_grad()
def ascent_direction(
    params: list[torch.Tensor], etas: list[float | None]
) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """(v, ‖T_w g‖₂) from ``.grad``: v = T_w²g per parameter (``.grad`` itself, not a copy, where T_w is the
    identity; None without a gradient), the norm over all of them on the first parameter's device.

    The perturbation is ε = ρ·v/(‖T_w g‖₂ + 1e-12). SAM, AsyncSAM and AsyncSAM's ascent worker all compute it here.
    """
    device = params[0].device if params else torch.device("cpu")
    vecs: list[torch.Tensor | None] = []
    norms = []
    for p, eta in zip(params, etas, strict=True):
        if p.grad is None:
            vecs.append(None)
            continue
        t = asam_t_w(p, eta)
        if t is None:
            norms.append(p.grad.norm(p=2).to(device))
            vecs.append(p.grad)
        else:
            norms.append((t * p.grad).norm(p=2).to(device))
            vecs.append(t * t * p.grad)  # (T_w·T_w)·g: with T_w = |w| bit-identical to davda54's w·w·g
    norm = torch.linalg.vector_norm(torch.stack(norms), ord=2) if norms else torch.zeros((), device=device)
    return vecs, norm


class SAM(torch.optim.Optimizer):
    """Wraps ``base_optimizer`` (a class) so each step descends with the gradient at the SAM-perturbed weights.

    ``rho`` and ``adaptive`` are defaults for every param group; a group may set its own. ``base_kwargs``
    (lr, momentum, weight_decay, ...) go to the base optimizer, which shares SAM's param groups, so LR
    schedules that edit ``optimizer.param_groups`` act on the base optimizer too. ``adaptive_form``
    (``"official"`` or ``"davda54"``) and ``adaptive_eta`` (η) choose ASAM's T_w for the adaptive groups; weights
    and biases are told apart by name (``model=`` or named params) or else by shape (module docstring).
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
        adaptive_form: str = "official",
        adaptive_eta: float = 0.01,
        **base_kwargs: Any,
    ):
        _check_rho(rho, "")
        _check_adaptive(adaptive_form, adaptive_eta)
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
        self.adaptive_form, self.adaptive_eta = adaptive_form, float(adaptive_eta)
        # ASAM's weight-vs-bias rule reads these names (first the model's, then torch's param_names)
        self._asam_names = {} if model is None else {id(p): n for n, p in model.named_parameters()}
        self._perturbed = False  # between first_step and second_step (the weights are at w + ε unless skipped)
        self._scaled = False  # first_step got a GradScaler; second_step must get one too
        self.last_step_skipped = False  # a GradScaler found inf/NaN gradients in either pass of the last step

    # ------------------------------------------------------------ the two passes

    def asam_etas(self) -> list[float | None]:
        """Per parameter, in param-group order: the η of ASAM's T_w = |w| + η, or None where T_w is the identity.

        None in groups that are not adaptive; the official form gives ``adaptive_eta`` to weights and None to the
        other parameters, a weight being a parameter whose name contains ``'weight'`` (names from ``model=``, then
        torch's ``param_names``) or, without a name, a tensor of two or more dimensions; davda54's form gives 0.0
        (T_w = |w|) to every parameter.
        """
        etas: list[float | None] = []
        for group in self.param_groups:
            group_names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if not group["adaptive"]:
                    etas.append(None)
                    continue
                if self.adaptive_form == "davda54":
                    etas.append(0.0)
                    continue
                name = self._asam_names.get(id(p), group_names[i] if group_names else None)
                weight = "weight" in name if name is not None else p.dim() >= 2
                etas.append(self.adaptive_eta if weight else None)
        return etas

    def _grad_norm(self) -> torch.Tensor:
        """‖T_w g‖₂ over all groups (T_w from :meth:`asam_etas`, 1 outside adaptive groups), on the first parameter's
        device."""
        params = [p for group in self.param_groups for p in group["params"]]
        return ascent_direction(params, self.asam_etas())[1]

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
        vectors, grad_norm = ascent_direction([p for g in self.param_groups for p in g["params"]], self.asam_etas())
        flat = iter(vectors)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + _EPS)
            for p in group["params"]:
                v = next(flat)
                if v is None:
                    continue
                state = self.state[p]
                state["old_p"] = p.detach().clone()
                # T_w²g is a fresh tensor: scale it in place (same bits as v * scale); g itself must stay intact
                e_w = v * scale.to(p.device) if v is p.grad else v.mul_(scale.to(p.device))
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
        # torch's LR schedulers wrap step() to set this flag and warn "lr_scheduler.step() before optimizer.step()"
        # without it; the two-call form never calls step(), and this is its optimizer step
        self._opt_called = True
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

        It runs twice: at w (the returned loss) and at the perturbed weights. With ``model=`` given to the
        constructor, the second run is wrapped in :func:`bn_stats_frozen`, so norm layers' running statistics are
        those of the first run only; without it both runs update them (pass ``model=``, or freeze them inside the
        closure on its second call, as leantrain's ``Trainer`` does). Without a closure, ``step()`` after
        ``first_step()`` is ``second_step()``: trainers that own the backward pass and then call
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
            # frozen around the backward too: autograd reads the statistics' tensors it saved in the forward
            frozen = bn_stats_frozen(self.model) if self.model is not None else contextlib.nullcontext()
            with torch.enable_grad(), frozen:
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

    @property
    def perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`second_step` (the weights are at w + ε, unless skipped)."""
        return self._perturbed

    def cancel_step(self) -> bool:
        """Undo a pending :meth:`first_step`: restore w bit-exactly, base optimizer untouched; False if none pending.

        For trainers whose ``optimizer.step()`` may not reach :meth:`second_step`, such as accelerate's fp16 path,
        where the GradScaler skips the call on inf/NaN gradients. Sets ``last_step_skipped``. It does not touch a
        GradScaler given to :meth:`first_step`; after cancelling such a step, call its ``update()`` yourself.
        """
        if not self._perturbed:
            return False
        self._restore()
        self.last_step_skipped = True
        return True

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
