"""LW-SAM (Layer-wise Adaptive Gradient Norm Penalizing, KDD 2024, arXiv 2503.14205).

SAM's second forward/backward doubles the cost of a step. The paper observes that penalizing the gradient norm of
only a few *critical* layers, those with the largest gradient norms, shrinks the gradient norm of the whole model.
So per step it perturbs only those layers w' by ε = ρ·g_{w'}/‖g_{w'}‖, recomputes the gradient only for w', mixes
it as G_i = (1−α)·g_i + α·g̃_i on w' (α = 1 is SAM restricted to w') and keeps the first gradient G_i = g_i
elsewhere. The critical layers are re-chosen every ``reselect_every`` steps.

What a "layer" is: given a model, one layer is every module that owns trainable parameters directly
(``parameters(recurse=False)``), in ``named_modules`` order, so a Linear/Conv is one layer with its bias and a
BatchNorm/LayerNorm affine pair is a layer of its own; a parameter shared by several modules belongs to the first.
Given a list of param-group dicts, each group is one layer (this is how to attach norm parameters to the preceding
module, or to exclude them); given a plain iterable of tensors, each tensor is one layer.

Deliberate departures and choices (the paper's defaults for r, α, k and R, and its selection schedule, could not be
retrieved: the full text and any official code are not public; see docs/lwsam.md):

- Built on :class:`~leantrain.optim.sam.SAM`: the perturbation, the bit-exact restore, the closure-first
  ``step(closure)`` and the base-optimizer sharing are SAM's. With every layer chosen and α = 1 a step equals SAM's.
- ``num_layers`` (k) defaults to 3, as in the spec's CPU reproduction; ``reselect_every`` defaults to 1 (select on
  every batch) because the optimizer does not know the epoch length; the spec recommends once per epoch, so pass
  ``reselect_every=steps_per_epoch`` (recipes do). Selection uses the current batch's plain gradient norms.
- Warm-up, chosen by measurement: at initialisation the largest gradient norms sit at the input (the first
  convolution), and a selection made there keeps the second pass running through the whole network for a whole
  period. ``select_after`` (recipes: the LR warm-up) makes the first ``select_after`` steps plain base-optimizer
  steps (one pass, no perturbation) and the first selection right after them; re-selection then counts from there.
- The perturbation is normalized by ‖g_{w'}‖ over the chosen layers only (the penalty's own form), not by the
  global ‖g‖ of GNP.
- Second pass. ``second_pass="truncated"`` (default with a model): every module call of the first pass is recorded
  and the modules that finished before the earliest chosen layer are replayed from their recorded outputs
  (:class:`~leantrain.optim.prefix_replay.PrefixReplay`), so only the suffix of the network runs again; where
  nothing can be replayed (the first layer chosen, other inputs) the pass runs in full, with the same result.
  ``"masked"`` runs the whole forward. In both, the parameters of the unchosen layers have ``requires_grad`` off
  during the second pass, so autograd computes weight gradients for w' only and stops below the earliest w'. The
  truncated pass gives bit-identical weights and BatchNorm buffers to the masked one (tested), except that dropout
  in the replayed prefix reuses the first pass's masks.
- ``first_step`` always takes the first gradient out of ``.grad`` (it is kept internally and handed back to the
  layers that are not chosen), so the second backward starts from empty gradients whatever ``zero_grad`` says.
- DDP: the non-chosen layers step with the first pass's gradient, so that pass must be all-reduced (run it with
  sync; :func:`~leantrain.optim.sam_step.sam_training_step` refuses ``ddp_no_sync=True`` here). The second pass
  bypasses DDP's reducer (a synced backward in which some weights get no gradient is a reducer error without
  ``find_unused_parameters``): ``second_step`` all-reduces the chosen layers' gradients itself, in one flat
  tensor. Build the optimizer from the DDP model, or call :meth:`LayerwiseSAM.use_ddp`
  (``sam_training_step`` and the Hugging Face adapter do).
- Mixed precision: ``first_step`` / ``second_step`` take ``grad_scaler=`` with SAM's semantics. The perturbed
  gradients are unscaled inside ``second_step`` before the kept (already unscaled) g is mixed back, so callers
  must not call ``grad_scaler.unscale_`` in between. On a skipped step (overflow in either pass) the weights,
  ``requires_grad`` and the base optimizer end as they were; a first-pass overflow also leaves the selection
  and the step counter alone.
- BatchNorm statistics: ``step(closure)`` freezes them during the perturbed pass (SAM's ``model=``, which a model
  given here provides); in the two-call form wrap the second pass in :func:`~leantrain.optim.sam.bn_stats_frozen`
  or use ``sam_training_step``.
- ``state_dict()`` is the base optimizer's plus an ``"lwsam"`` entry holding the step counter, the current
  selection and the last per-layer gradient norms, so a resumed run re-chooses on the same steps as an
  uninterrupted one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from leantrain.errors import ConfigError, LeantrainError
from leantrain.optim.prefix_replay import PrefixReplay
from leantrain.optim.sam import SAM, _enabled

_SELECTIONS = ("grad_norm",)
_SECOND_PASSES = ("truncated", "masked")


def _layers_of(model_or_params: Any) -> tuple[Any, list[str], list[list[torch.Tensor]] | None]:
    """(params for the optimizer, layer names, layers or None when each param group is one layer)."""
    if isinstance(model_or_params, nn.Module):
        seen: set[int] = set()
        layers, names = [], []
        for name, module in model_or_params.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
            if own:
                seen.update(id(p) for p in own)
                layers.append(own)
                names.append(name or "<root>")
        return [{"params": [p for layer in layers for p in layer]}], names, layers
    items = list(model_or_params)
    if items and all(isinstance(item, dict) for item in items):
        return items, [f"group{i}" for i in range(len(items))], None
    return items, [f"param{i}" for i in range(len(items))], [[p] for p in items]


def _warn_if_distributed() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        warnings.warn(
            "LayerwiseSAM runs under torch.distributed but does not know the DistributedDataParallel model: a DDP "
            "second pass with unchosen layers frozen breaks DDP's reducer. Build LayerwiseSAM(ddp_model, ...) or call "
            "optimizer.use_ddp(ddp_model) (sam_training_step does it for you)",
            stacklevel=3,
        )


def _check_int(value: Any, field: str, low: int, high: int | None, what: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"LayerwiseSAM {field}={value!r} is invalid; {what} must be an integer in {bound}")


class LayerwiseSAM(SAM):
    """SAM on the ``num_layers`` layers with the largest gradient norms, re-chosen every ``reselect_every`` steps.

    ``model_or_params`` is a model (one layer per module owning parameters), a list of param-group dicts (one
    layer per group) or an iterable of tensors (one layer per tensor). ``alpha`` mixes the gradients of the chosen
    layers as (1−α)·g + α·g̃; ``base_kwargs`` go to the base optimizer as for :class:`SAM`.
    """

    requires_closure = True
    applies_first_gradient = True  # non-chosen layers step with g: under DDP the first pass must be all-reduced

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        num_layers: int = 3,
        reselect_every: int = 1,
        selection: str = "grad_norm",
        alpha: float = 1.0,
        select_after: int = 0,
        second_pass: str | None = None,
        **base_kwargs: Any,
    ):
        if not isinstance(rho, int | float) or isinstance(rho, bool) or not rho > 0:
            raise ConfigError(f"LayerwiseSAM rho={rho!r} is invalid; rho is the perturbation radius and must be > 0")
        if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 < alpha <= 1:
            raise ConfigError(f"LayerwiseSAM alpha={alpha!r} is invalid; alpha mixes the gradients, range (0, 1]")
        if selection not in _SELECTIONS:
            raise ConfigError(f"LayerwiseSAM selection={selection!r} is invalid; accepted values: {_SELECTIONS}")
        ddp = model_or_params if isinstance(model_or_params, DistributedDataParallel) else None
        model = ddp.module if ddp is not None else model_or_params
        model = model if isinstance(model, nn.Module) else None
        params, names, layers = _layers_of(model if model is not None else model_or_params)
        if not names:
            raise ConfigError("LayerwiseSAM got no trainable parameters; pass a model or a non-empty parameter list")
        _check_int(num_layers, "num_layers", 1, len(names), f"the number of perturbed layers (of {len(names)})")
        _check_int(reselect_every, "reselect_every", 1, None, "the re-selection period in steps")
        _check_int(select_after, "select_after", 0, None, "the number of warm-up steps before the first selection")
        if second_pass is None:
            second_pass = "truncated" if model is not None else "masked"
        if second_pass not in _SECOND_PASSES:
            raise ConfigError(f"LayerwiseSAM second_pass={second_pass!r} is invalid; accepted: {_SECOND_PASSES}")
        if second_pass == "truncated" and model is None:
            raise ConfigError(
                "LayerwiseSAM second_pass='truncated' needs the model (its module calls are replayed); pass the model "
                "instead of parameters, or second_pass='masked'"
            )
        super().__init__(params, base_optimizer, rho=rho, model=model, **base_kwargs)
        self.layers = layers if layers is not None else [list(group["params"]) for group in self.param_groups]
        self.second_pass = second_pass
        self.replay = PrefixReplay(model) if second_pass == "truncated" else None
        self.select_after = select_after
        self._ddp = ddp
        self._ddp_sync: bool | None = None  # DDP's require_backward_grad_sync, saved while the second pass runs
        self._warmup = False  # this step is a warm-up step: no perturbation, the first gradient is applied
        self.layer_names = names
        self.num_layers = num_layers
        self.reselect_every = reselect_every
        self.selection_metric = selection
        self.alpha = float(alpha)
        self.step_count = 0  # completed first_steps
        self.selection: tuple[int, ...] = ()  # indices into self.layers, largest norm first
        self.selected_at = -1  # step_count at which self.selection was made
        self.layer_norms: list[float] = []  # per-layer ‖g_i‖ at the last selection: the paper's diagnostic
        self._masked: list[torch.Tensor] = []  # params whose requires_grad is off during the perturbed pass
        self.last_replayed = 0  # modules whose forward the last truncated second pass replayed (0: a full pass)

    @property
    def in_warmup(self) -> bool:
        """True while the next step is a warm-up step (before ``select_after`` steps): no second pass is needed."""
        return self.step_count < self.select_after

    @property
    def needs_second_pass(self) -> bool:
        """False when the pending (or next) step ignores the perturbed gradient: a loop may skip its second pass."""
        return not (self._warmup if self._perturbed else self.in_warmup)

    # ------------------------------------------------------------ selection

    @torch.no_grad()
    def select_layers(self) -> tuple[int, ...]:
        """Choose the ``num_layers`` layers with the largest ‖g_i‖₂ from the gradients now in ``.grad``."""
        device = self.layers[0][0].device
        norms = []
        for layer in self.layers:
            sq = [p.grad.double().pow(2).sum().to(device) for p in layer if p.grad is not None]
            norms.append(torch.stack(sq).sum().sqrt() if sq else torch.zeros((), dtype=torch.float64, device=device))
        self.layer_norms = torch.stack(norms).tolist()  # one sync per selection, not per step
        ranked = sorted(range(len(self.layers)), key=lambda i: (-self.layer_norms[i], i))  # ties: earliest layer
        self.selection = tuple(ranked[: self.num_layers])
        self.selected_at = self.step_count
        return self.selection

    # ------------------------------------------------------------ the two passes

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Maybe re-choose w', perturb only w', keep g and switch off ``requires_grad`` outside w'.

        Needs the gradient at w in ``.grad``; leaves ``.grad`` empty for the perturbed forward/backward. With
        ``grad_scaler`` the gradient is unscaled first (selection sees true norms); if it overflowed, nothing is
        chosen, perturbed or masked, the step counter does not advance and :meth:`second_step` skips the step.
        During the first ``select_after`` steps (warm-up) nothing is chosen or perturbed: the step applies g, and a
        second pass, if the caller runs one, is ignored (:attr:`needs_second_pass` is False).
        """
        if self._perturbed:
            raise LeantrainError("LayerwiseSAM.first_step was called twice without second_step in between")
        grad_scaler = _enabled(grad_scaler)
        params = [p for layer in self.layers for p in layer]
        self._warmup = self.in_warmup
        if grad_scaler is not None and self._warmup:
            self._scaled, self.last_step_skipped = True, False  # g stays scaled: second_step's base step unscales it
        elif grad_scaler is not None and not self._unscale_ascent(grad_scaler):
            self._warmup = False
            for p in params:
                p.grad = None  # as on a normal step, the second backward starts from empty gradients
            if self.replay is not None:
                self.replay.disarm()
            return
        if not self._warmup and (
            not self.selection or (self.step_count - self.select_after) % self.reselect_every == 0
        ):
            self.select_layers()
        chosen = self._chosen()
        for p in params:
            state = self.state[p]
            state["g"] = p.grad  # moved out, so a zero_grad(set_to_none=False) in the closure cannot touch it
            if id(p) not in chosen:
                p.grad = None  # SAM.first_step perturbs only params with a gradient, normalizing over those
                state.pop("e_w", None)
        if self._warmup:
            self._perturbed = True  # nothing moved; second_step applies g
        else:
            super().first_step(zero_grad=False)  # unscaled already (and _scaled set): SAM must not unscale again
        for p in params:
            p.grad = None
            if not self._warmup and id(p) not in chosen and p.requires_grad:
                p.requires_grad_(False)  # autograd then skips these weights and stops below the earliest w'
                self._masked.append(p)
        if not self._warmup:
            if self._ddp is None and self._masked:
                _warn_if_distributed()
            if self._ddp is not None:  # the second pass must not wake DDP's reducer; second_step all-reduces
                self._ddp_sync = self._ddp.require_backward_grad_sync
                self._ddp.require_backward_grad_sync = False
            if self.replay is not None:
                self.last_replayed = self.replay.arm([p for i in self.selection for p in self.layers[i]])
        self.step_count += 1

    def use_ddp(self, model: DistributedDataParallel) -> None:
        """Tell the optimizer that ``model`` (a DDP wrapper of its model) runs the passes; idempotent.

        Needed when the optimizer was built from the unwrapped model: the second pass then bypasses DDP's reducer
        (some weights have no gradient in it) and ``second_step`` all-reduces the perturbed gradients itself.
        :func:`~leantrain.optim.sam_step.sam_training_step` calls it for you.
        """
        if not isinstance(model, DistributedDataParallel):
            raise ConfigError(f"LayerwiseSAM.use_ddp needs a DistributedDataParallel, not {type(model).__name__}")
        if self.model is not None and model.module is not self.model:
            raise ConfigError("LayerwiseSAM.use_ddp got a DDP model that does not wrap this optimizer's model")
        self._ddp = model

    def _chosen(self) -> set[int]:
        """ids of the parameters perturbed this step (none during warm-up)."""
        return set() if self._warmup else {id(p) for i in self.selection for p in self.layers[i]}

    def step(self, closure: Any = None) -> torch.Tensor:  # type: ignore[override]
        """SAM's ``step(closure)``; during warm-up the closure runs once and the step applies its gradient."""
        if closure is not None and not self._perturbed and self.in_warmup:
            with torch.enable_grad():
                loss = closure()
            self.first_step()
            self.second_step()
            return loss
        return super().step(closure)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Restore w and ``requires_grad``, set G (mixed on w', g elsewhere) and let the base optimizer step.

        With ``grad_scaler`` (the one given to :meth:`first_step`) the perturbed gradients are unscaled before g
        is mixed back in, and an overflow in either pass skips the step as in :meth:`SAM.second_step`. Do not
        call ``grad_scaler.unscale_`` yourself in between: this method does it.
        """
        if not self._perturbed:
            raise LeantrainError("LayerwiseSAM.second_step was called without first_step; call first_step first")
        grad_scaler = _enabled(grad_scaler)
        self._check_same_scaler(grad_scaler)
        chosen = self._chosen()
        kept_g = any("g" in self.state.get(p, {}) for layer in self.layers for p in layer)
        if self._ddp is not None and chosen and kept_g:
            self._all_reduce_chosen()  # before unscaling, so every replica's scaler sees the same (reduced) values
        if grad_scaler is not None and not self.last_step_skipped and not self._warmup:
            grad_scaler.unscale_(self.base_optimizer)  # only the chosen layers have a gradient now; g is unscaled
        for layer in self.layers:
            for p in layer:
                if "g" not in self.state.get(p, {}):
                    continue  # a skipped first_step kept no g
                g = self.state[p].pop("g")
                if id(p) not in chosen or p.grad is None:
                    p.grad = g
                elif self.alpha != 1.0 and g is not None:
                    p.grad.mul_(self.alpha).add_(g, alpha=1.0 - self.alpha)
        super().second_step(zero_grad=zero_grad, grad_scaler=grad_scaler)

    @torch.no_grad()
    def _all_reduce_chosen(self) -> None:
        """Average the perturbed gradients over the DDP replicas (the second pass ran without DDP's reducer)."""
        params = [p for i in self.selection for p in self.layers[i]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        present = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
        flat = torch._utils._flatten_dense_tensors([*grads, present])  # one all-reduce, gradients and presence
        group = self._ddp.process_group
        torch.distributed.all_reduce(flat, group=group)
        *reduced, anywhere = torch._utils._unflatten_dense_tensors(flat, [*grads, present])
        world = torch.distributed.get_world_size(group)
        for p, g, seen in zip(params, reduced, anywhere.tolist(), strict=True):
            p.grad = g.div_(world) if seen else None  # no replica had a gradient: stays None, as without DDP

    @torch.no_grad()
    def _restore(self) -> None:
        super()._restore()
        for p in self._masked:
            p.requires_grad_(True)
        self._masked.clear()
        if self.replay is not None:
            self.replay.disarm()
        if self._ddp is not None and self._ddp_sync is not None:
            self._ddp.require_backward_grad_sync = self._ddp_sync
            self._ddp_sync = None
        self._warmup = False
        for layer in self.layers:  # a cancelled step must not leave the kept first gradient behind
            for p in layer:
                self.state.get(p, {}).pop("g", None)

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus ``"lwsam"``: step counter, selection and last layer norms."""
        state = dict(super().state_dict())
        state["lwsam"] = {
            "step_count": self.step_count,
            "selection": list(self.selection),
            "selected_at": self.selected_at,
            "layer_norms": list(self.layer_norms),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("lwsam", None)
        if self._perturbed:
            self._restore()
        super().load_state_dict(state_dict)
        if extra is None:
            return
        selection = tuple(int(i) for i in extra["selection"])
        if any(not 0 <= i < len(self.layers) for i in selection):
            raise ConfigError(
                f"LayerwiseSAM checkpoint selection={list(selection)} names layers outside [0, {len(self.layers)}); "
                "the checkpoint was saved for a different model"
            )
        self.selection = selection
        self.step_count = int(extra["step_count"])
        self.selected_at = int(extra["selected_at"])
        self.layer_norms = [float(n) for n in extra["layer_norms"]]
