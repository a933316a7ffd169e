"""AsyncSAM (Asynchronous Sharpness-Aware Minimization, arXiv 2503.11147): SAM with a stale perturbation.

SAM's ascent (the perturbation ε = ρ·g/‖g‖) and descent (the gradient at w + ε) are sequential. AsyncSAM builds
ε from a gradient ``staleness`` steps old, w_{t+1} = w_t − η·∇L_{B_t}(w_t + ρ·ĝ_{t−τ}), so in the paper the
ascent runs concurrently on an otherwise idle slower device and the step costs about what SGD's does. τ = 1 in
the paper; τ = 0 is SAM.

This module is the paper's math in one process (the spec's ``async_mode=False``): each ``step(closure)`` computes
the gradient at w_t (the ascent for a later step, and the returned loss), queues its ε, takes the ε computed
``staleness`` steps earlier, evaluates the closure at w_t + ε and lets the base optimizer step with that gradient.
While the queue is still filling (the first ``staleness`` steps) the step is a plain base-optimizer step on the
gradient at w_t.

Deliberate departures and choices:

- The ascent batch is the descent batch of the step it was computed in (B' = B_{t−τ}); the paper draws a
  separate, smaller ascent batch sized to the slow device, which needs the two-device mode (not built yet).
- In this single-process mode a step costs two forward/backward passes, like SAM: it reproduces AsyncSAM's
  accuracy semantics, not its speed. The speed claim needs the two-process mode.
- The queued perturbations are part of ``state_dict()``, so a resumed run is identical to an uninterrupted one
  (the spec allows restarting with ε = 0; keeping them is exact and costs ``staleness`` weight copies).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from leantrain.errors import ConfigError, LeantrainError
from leantrain.optim.sam import _EPS, SAM


class AsyncSAM(SAM):
    """SAM whose perturbation comes from the gradient ``staleness`` steps earlier (single-process mode)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        staleness: int = 1,
        adaptive: bool = False,
        **base_kwargs: Any,
    ):
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise ConfigError(f"AsyncSAM staleness={staleness!r} is invalid; accepted: an integer >= 0 (paper: 1)")
        super().__init__(params, base_optimizer=base_optimizer, rho=rho, adaptive=adaptive, **base_kwargs)
        self.staleness = staleness
        self._pending: list[list[torch.Tensor | None]] = []  # queued ε, one entry per parameter (flat order)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def _ascent(self) -> list[torch.Tensor | None]:
        """ε = ρ·T_w²g/‖T_w g‖ from the gradients now in ``.grad`` (None where a parameter has none)."""
        grad_norm = self._grad_norm()
        out: list[torch.Tensor | None] = []
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + _EPS)
            for p in group["params"]:
                if p.grad is None:
                    out.append(None)
                else:
                    out.append((p * p * p.grad if group["adaptive"] else p.grad) * scale.to(p.device))
        return out

    @torch.no_grad()
    def _perturb(self, eps: list[torch.Tensor | None]) -> None:
        for p, e_w in zip(self._params(), eps, strict=True):
            if e_w is not None:
                self.state[p]["old_p"] = p.detach().clone()
                p.add_(e_w)
        self._perturbed = True

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One AsyncSAM step; ``closure`` zeroes grads, computes the loss, backward, returns the loss."""
        if closure is None:
            raise LeantrainError(
                "AsyncSAM.step needs a closure that zeroes grads, computes the loss, calls backward and returns it"
            )
        with torch.enable_grad():
            loss = closure()  # gradient at w_t: the ascent of step t + staleness
        self._pending.append(self._ascent())
        if len(self._pending) <= self.staleness:
            self.base_optimizer.step()  # no perturbation computed yet: a plain step on the gradient at w_t
            return loss
        self._perturb(self._pending.pop(0))
        try:
            with torch.enable_grad():
                closure()  # gradient at w_t + ε_{t−τ}: the descent
        except BaseException:
            self._restore()
            raise
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["asyncsam_pending"] = [[None if e is None else e.clone() for e in eps] for eps in self._pending]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        pending = state_dict.pop("asyncsam_pending", [])
        super().load_state_dict(state_dict)
        params = self._params()
        self._pending = [
            [None if e is None else e.to(p.device, p.dtype) for p, e in zip(params, eps, strict=True)]
            for eps in pending
        ]
