"""mL-BFGS (Niu, Fabian, Lee, Soltanolkotabi, Avestimehr, "mL-BFGS: A Momentum-based L-BFGS for Distributed
Large-Scale Neural Network Optimization", TMLR 2023, OpenReview 9jnsPp8DP3, arXiv 2307.13744; official code
``yuehniu/mL-BFGS``, ``opt/slimblock.py``).

Stochastic L-BFGS is unstable in deep learning because the curvature pairs (s, y), differences of noisy
minibatch iterates and gradients, are noisy. mL-BFGS keeps cheap momentum (EMA) buffers of the parameters
and of the gradients and builds a pair every T steps from the change of those smoothed quantities:
s = ΔM_θ, y = ΔM_g. Pairs are Powell-damped so that sᵀŷ ≥ σ_L·sᵀs, kept in a FIFO of size m, and the
preconditioned direction d = H·g comes from the L-BFGS two-loop recursion. For scale the Hessian is
approximated block-diagonally: every block (by default a param group) has its own history and its own
two-loop. The direction, by default divided by its global L2 norm (official block file), then drives SGD with
momentum: buf ← μ·buf + d, θ ← θ − η·buf. Until a block has its first pair (after 2T steps) its direction is the
plain gradient, unscaled, so warm-up is exactly SGD with momentum.

Deliberate departures and choices (the paper's method sections could not be read, see the project spec §4;
where the official code differs from the clean algorithm, the clean algorithm is the default, except the
direction scaling, where the default follows the official block file as the spec recommends):

- EMAs are normalized, M ← β·M + (1−β)·x, as the paper writes; the official block file keeps un-normalized
  decayed sums (≈1000× larger for β = 0.999), which changes the damping mix ŷ = φy + (1−φ)s. Not offered.
- EMAs start at the first observed value, not at zero, so the first pairs are not dominated by the EMA's
  warm-up bias (a zero-initialized M_θ would make s ≈ (1−β^T)·θ rather than a trajectory difference).
- The gradient fed to the EMA and to the two-loop is g + wd·θ (paper). The official block file adds
  ``wd·g`` (a bug); not copied. Params outside every block get plain SGD with momentum and weight decay;
  the official code drops their weight decay once preconditioning starts; not copied.
- ``refresh_grad_ema=True`` reproduces the official code's reset of M_g to the current gradient after each
  pair ("refresh-g"); default False (paper).
- ``direction_scaling`` (spec §4's recommendation: all three, the block file's behaviour by default):
  "global_norm" (default; official block file ``slimblock.py``): every direction is divided by the global L2
  norm of all directions, so once preconditioning starts η is the length of the step before momentum, whatever
  the scale of H (the official norm counts only preconditioned blocks, which differs only when blocks do not
  cover every param). "none": η multiplies H·g directly, so H's scale sets the step (H ≈ inverse Hessian wants
  η ≈ 1; at an SGD lr a pair that reports curvature at the σ_L floor enlarges the step up to 1/σ_L = 100×).
  "kl_clip" (official full-model file ``slim.py``): scale by min(1, √(kl_clip / gᵀd)). Scaling applies only
  once some block has a pair, so warm-up stays exactly SGD with momentum at η (as in the official code, the
  same η is first an SGD lr and then a step length).
- "Double momentum" on pairs (official block file): s_k ← (1−β_pair)·s_k + β_pair·s_{k−1} with s_{k−1} the
  previous *accepted* smoothed pair; same for y, mixed with the previous undamped y (the official file mixes
  in the previous *damped* ŷ, which compounds the damping from pair to pair). ``beta_pair=0`` turns it off.
- The pair-rejection test is scale-free: a pair is dropped when sᵀŷ ≤ rho_min·‖s‖·‖ŷ‖ (or is not finite).
  The official code's absolute test sᵀŷ < 1e-4 depends on the EMA normalization and the parameter scale.
- ``step(closure=None)`` has the torch signature (the official one takes ``epoch``); there is no line search
  and no closure is needed. Blocks are not sharded across DDP ranks (neither are they in the official code):
  call ``step`` after the gradient all-reduce and every rank computes the same update.
- History tensors live in the optimizer state of each block's first param (keys ``hist_s``, ``hist_y`` of
  shape (k, d_block), ``hist_sy`` of shape (k,)), so ``state_dict()`` / ``load_state_dict()`` carry them
  and a resumed run is bit-identical to an uninterrupted one. ``state_dict()`` also saves the block partition
  (``"mlbfgs_blocks"``, param positions); ``load_state_dict`` checks it, the group sizes and every state shape
  and raises ConfigError naming the mismatch, rather than failing with a shape error at the next step.
- ``add_param_group`` gives the new group the blocks it would have had at construction (with a listed
  partition, which cannot name later params, the group becomes one block). Its blocks start their own EMAs and
  warm-up, exactly as a group present from the start whose params had no gradient until then.
- Params whose ``.grad`` is None count as zero gradient inside their block and are not updated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from leantrain.errors import ConfigError

_DIRECTION_SCALINGS = ("none", "global_norm", "kl_clip")
# optimizer-state keys of a block, kept on the block's first param (see _block_direction)
_BLOCK_STATE = (
    "mlbfgs_steps", "ema_param", "ema_grad", "snap_param", "snap_grad", "pair_s", "pair_y",
    "hist_s", "hist_y", "hist_sy",
)  # fmt: skip
_CHECKPOINT_FIX = "build the optimizer over the same model, param groups and blocks as the saved run before loading"


def _check(name: str, value: Any, ok: bool, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"MLBFGS {name}={value!r} is invalid; {name} must be {accepted}")


def _is_real(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and not math.isnan(x)


def _check_group(g: dict[str, Any], where: str) -> None:
    """Validate the per-group hyperparameters; ``where`` prefixes the field name (e.g. 'param_groups[1].')."""
    real = {k: _is_real(g[k]) for k in g if k != "params"}
    _check(f"{where}lr", g["lr"], real["lr"] and 0 < g["lr"] < math.inf, "in (0, inf)")
    for k in ("momentum", "beta_param", "beta_grad", "beta_pair", "damping", "sigma_low"):
        _check(f"{where}{k}", g[k], real[k] and 0 <= g[k] < 1, "in [0, 1)")
    _check(f"{where}sigma_high", g["sigma_high"], real["sigma_high"] and g["sigma_high"] > 1, "in (1, inf]")
    for k in ("weight_decay", "rho_min"):
        _check(f"{where}{k}", g[k], real[k] and 0 <= g[k] < math.inf, "in [0, inf)")
    for k in ("history_size", "update_freq"):
        _check(f"{where}{k}", g[k], isinstance(g[k], int) and not isinstance(g[k], bool) and g[k] >= 1, "an int >= 1")


def damp_curvature_pair(
    s: torch.Tensor, y: torch.Tensor, sigma_low: float, sigma_high: float, damping: float
) -> torch.Tensor:
    """Powell-damped ŷ = φ·y + (1−φ)·s, which keeps sᵀŷ/sᵀs in [sigma_low, sigma_high] (for any s ≠ 0).

    μ = sᵀy/sᵀs; φ = (1−σ_L)/(1−μ) if μ < σ_L, (σ_H−1)/(μ−1) if μ > σ_H, else 1; then φ ≤ 1 − damping.
    Shrinking φ further only moves sᵀŷ/sᵀs towards 1, so the lower bound σ_L still holds.
    """
    mu = s.dot(y) / s.dot(s)
    one = torch.ones_like(mu)
    phi = torch.where(mu < sigma_low, (1 - sigma_low) / (1 - mu), one)
    phi = torch.where(mu > sigma_high, (sigma_high - 1) / (mu - 1), phi)  # sigma_high=inf: never taken
    phi = phi.clamp(max=1 - damping)
    return phi * y + (1 - phi) * s  # (d,)


def _two_loop(g: torch.Tensor, hs: torch.Tensor, hy: torch.Tensor, hsy: torch.Tensor) -> torch.Tensor:
    """H·g by the L-BFGS two-loop recursion; hs, hy: (k, d) oldest first, hsy: (k,) = sᵢᵀŷᵢ; H0 = γI."""
    q = g.clone()  # (d,)
    alphas = []
    for i in reversed(range(hs.shape[0])):
        a = hs[i].dot(q) / hsy[i]
        q.sub_(a * hy[i])
        alphas.append(a)
    r = q * (hsy[-1] / hy[-1].dot(hy[-1]))  # γ = sᵀŷ/ŷᵀŷ of the newest pair
    for i, a in zip(range(hs.shape[0]), reversed(alphas), strict=True):
        b = hy[i].dot(r) / hsy[i]
        r.add_(hs[i] * (a - b))
    return r


class MLBFGS(torch.optim.Optimizer):
    """Momentum-based block-wise L-BFGS: SGD with momentum on the two-loop direction of EMA curvature pairs.

    Per param group (defaults from the official ``run-SLIM.sh``, the spec's "paper settings"):
    ``lr``, ``momentum`` (SGD momentum on the direction, [0, 1)), ``weight_decay``, ``beta_param`` /
    ``beta_grad`` (EMA of θ and of g, [0, 1)), ``beta_pair`` (double momentum on pairs, 0 = off),
    ``update_freq`` (T: a pair every T steps), ``history_size`` (m), ``damping`` (δ: φ ≤ 1 − δ),
    ``sigma_low`` / ``sigma_high`` (damping bounds on sᵀy/sᵀs; ``math.inf`` disables the upper one),
    ``rho_min`` (relative pair-rejection threshold).

    ``blocks``: "group" (default: each param group is one block), "param" (one block per param), or a list of
    param lists (each inside one group; params in no block get plain SGD with momentum; a group added later
    with ``add_param_group`` is one block). Global options:
    ``direction_scaling`` ("global_norm" (default: η is the step length once a pair exists) | "none" |
    "kl_clip"), ``kl_clip``, ``refresh_grad_ema``.
    """

    requires_closure = False  # Trainer runs loss.backward() and then step(); a closure is optional

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        beta_param: float = 0.999,
        beta_grad: float = 0.999,
        beta_pair: float = 0.9,
        update_freq: int = 50,
        history_size: int = 10,
        damping: float = 0.01,
        sigma_low: float = 0.01,
        sigma_high: float = 1.5,
        rho_min: float = 1e-4,
        blocks: str | Sequence[Sequence[torch.Tensor]] = "group",
        direction_scaling: str = "global_norm",
        kl_clip: float | None = None,
        refresh_grad_ema: bool = False,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, beta_param=beta_param, beta_grad=beta_grad,
            beta_pair=beta_pair, update_freq=update_freq, history_size=history_size, damping=damping,
            sigma_low=sigma_low, sigma_high=sigma_high, rho_min=rho_min,
        )  # fmt: skip
        _check_group(defaults, "")
        _check(
            "direction_scaling",
            direction_scaling,
            direction_scaling in _DIRECTION_SCALINGS,
            f"one of {_DIRECTION_SCALINGS}",
        )
        if direction_scaling == "kl_clip":
            ok = _is_real(kl_clip) and 0 < kl_clip < math.inf
            _check("kl_clip", kl_clip, ok, "in (0, inf) when direction_scaling='kl_clip'")
        # (group index, params) per block, in a fixed order so a resumed optimizer finds the same states.
        # add_param_group fills it as groups arrive, at construction and after, so a group added later gets
        # exactly the blocks it would have had at construction; a listed partition is built once all groups exist.
        self._blocks: list[tuple[int, list[torch.Tensor]]] = []
        self._block_rule = blocks if isinstance(blocks, str) and blocks in ("group", "param") else "listed"
        super().__init__(params, defaults)
        self.direction_scaling = direction_scaling
        self.kl_clip = kl_clip
        self.refresh_grad_ema = bool(refresh_grad_ema)
        if self._block_rule == "listed":
            self._blocks = self._build_listed_blocks(blocks)
            self._block_rule = "group"  # the list cannot name a later group's params: a later group is one block

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, plus validation and the group's blocks (see ``blocks``)."""
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        try:
            _check_group(group, f"param_groups[{gi}].")
        except ConfigError:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise
        if self._block_rule == "param":
            self._blocks.extend((gi, [p]) for p in group["params"])
        elif self._block_rule == "group" and group["params"]:
            self._blocks.append((gi, list(group["params"])))

    def _build_listed_blocks(self, blocks: Any) -> list[tuple[int, list[torch.Tensor]]]:
        """Blocks from ``blocks`` given as a list of param lists, in the list's order."""
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        accepted = "'group', 'param' or a list of param lists, each param in one block and one param group"
        if isinstance(blocks, str) or not isinstance(blocks, Sequence):
            _check("blocks", blocks, False, accepted)
        out, seen = [], set()
        for j, block in enumerate(blocks):
            params = list(block)
            ids = [id(p) for p in params]
            ok = bool(params) and all(i in group_of and i not in seen for i in ids) and len(set(ids)) == len(ids)
            _check(f"blocks[{j}]", f"<{len(params)} params>", ok, accepted)
            _check(f"blocks[{j}]", f"<{len(params)} params>", len({group_of[i] for i in ids}) == 1, accepted)
            seen.update(ids)
            out.append((group_of[ids[0]], params))
        return out

    # ------------------------------------------------------------ checkpoints

    def _block_positions(self) -> list[list[int]]:
        """Each block's params as positions in the flattened param groups (the ids of torch's state_dict)."""
        pos = {id(p): k for k, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return [[pos[id(p)] for p in params] for _, params in self._blocks]

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"mlbfgs_blocks"`` (the partition, as in ``_block_positions``)."""
        state = dict(super().state_dict())
        state["mlbfgs_blocks"] = self._block_positions()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, after checking that the checkpoint's groups, blocks and state shapes fit this optimizer.

        A mismatch raises ConfigError naming the group, block or param, instead of a shape error at the next step.
        A checkpoint without ``"mlbfgs_blocks"`` (written before it was saved) is checked by its shapes only.
        """
        state_dict = dict(state_dict)
        saved_blocks = state_dict.pop("mlbfgs_blocks", None)
        self._check_checkpoint_layout(state_dict["param_groups"], saved_blocks)
        self._check_checkpoint_shapes(state_dict)
        super().load_state_dict(state_dict)

    def _check_checkpoint_layout(self, saved_groups: list[dict[str, Any]], saved_blocks: Any) -> None:
        if len(saved_groups) != len(self.param_groups):
            raise ConfigError(
                f"MLBFGS checkpoint has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}; {_CHECKPOINT_FIX}"
            )
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ConfigError(
                    f"MLBFGS checkpoint param_groups[{i}] has {len(saved['params'])} params, this optimizer's "
                    f"param_groups[{i}] has {len(group['params'])}; {_CHECKPOINT_FIX}"
                )
        if saved_blocks is None:
            return
        saved_blocks = [[int(k) for k in block] for block in saved_blocks]
        blocks = self._block_positions()
        if len(saved_blocks) != len(blocks):
            raise ConfigError(
                f"MLBFGS checkpoint has {len(saved_blocks)} blocks, this optimizer has {len(blocks)}; "
                + _CHECKPOINT_FIX
            )
        for j, (saved, block) in enumerate(zip(saved_blocks, blocks, strict=True)):
            if saved != block:
                raise ConfigError(
                    f"MLBFGS checkpoint block {j} holds params {saved}, this optimizer's block {j} holds {block} "
                    f"(positions in the flattened param groups); {_CHECKPOINT_FIX}"
                )

    def _check_checkpoint_shapes(self, state_dict: dict[str, Any]) -> None:
        """Block state only on each block's first param, with the block's size; momentum buffers as their params."""
        params = [p for g in self.param_groups for p in g["params"]]
        names = [
            f"param_groups[{i}].params[{j}]" for i, g in enumerate(self.param_groups) for j in range(len(g["params"]))
        ]
        heads = {
            block[0]: (j, sum(params[k].numel() for k in block)) for j, block in enumerate(self._block_positions())
        }
        saved_ids = [k for g in state_dict["param_groups"] for k in g["params"]]  # position -> id in the checkpoint
        states = [state_dict["state"].get(saved_id, {}) for saved_id in saved_ids]
        for k, st in enumerate(states):  # the partition first: it explains any block-state shape below
            block_keys = [key for key in st if key in _BLOCK_STATE]
            if block_keys and k not in heads:
                raise ConfigError(
                    f"MLBFGS checkpoint {names[k]} holds block state ({block_keys[0]}) but starts no block in this "
                    f"optimizer, so the checkpoint was saved with other blocks; {_CHECKPOINT_FIX}"
                )
        for k, st in enumerate(states):
            buf = st.get("momentum_buffer")
            if isinstance(buf, torch.Tensor) and buf.shape != params[k].shape:
                raise ConfigError(
                    f"MLBFGS checkpoint {names[k]} has momentum_buffer of shape {tuple(buf.shape)}, expected "
                    f"{tuple(params[k].shape)} (the param's shape); {_CHECKPOINT_FIX}"
                )
            if k not in heads:
                continue
            j, d = heads[k]
            sy = st.get("hist_sy")
            n = sy.shape[0] if isinstance(sy, torch.Tensor) and sy.dim() > 0 else 0  # pairs in the history
            for key in (key for key in st if key in _BLOCK_STATE):
                shape = (n, d) if key in ("hist_s", "hist_y") else (n,) if key == "hist_sy" else (d,)
                value = st[key]
                if isinstance(value, torch.Tensor) and tuple(value.shape) != shape:
                    raise ConfigError(
                        f"MLBFGS checkpoint block {j} (first param {names[k]}, {d} values) has {key} of shape "
                        f"{tuple(value.shape)}, expected {shape}; {_CHECKPOINT_FIX}"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One mL-BFGS step on the gradients in ``.grad`` (the closure, if given, recomputes them first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        directions: dict[torch.Tensor, torch.Tensor] = {}
        grads: dict[torch.Tensor, torch.Tensor] = {}
        preconditioned = False
        blocked = set()
        for gi, params in self._blocks:
            blocked.update(id(p) for p in params)
            if all(p.grad is None for p in params):
                continue
            grad, direction, used = self._block_direction(self.param_groups[gi], params)
            preconditioned |= used
            sizes = [p.numel() for p in params]
            for p, g, d in zip(params, grad.split(sizes), direction.split(sizes), strict=True):
                if p.grad is not None:
                    grads[p], directions[p] = g.view_as(p), d.view_as(p)
        for group in self.param_groups:  # params in no block: plain SGD direction
            for p in group["params"]:
                if id(p) not in blocked and p.grad is not None:
                    grads[p] = directions[p] = p.grad.add(p, alpha=group["weight_decay"])
        if preconditioned and self.direction_scaling != "none":
            self._scale_directions(grads, directions)
        for group in self.param_groups:
            for p in group["params"]:
                if p in directions:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    buf.mul_(group["momentum"]).add_(directions[p])
                    p.add_(buf, alpha=-group["lr"])
        return loss

    def _scale_directions(self, grads: dict, directions: dict) -> None:
        if self.direction_scaling == "global_norm":
            norm = torch.sqrt(sum(d.square().sum() for d in directions.values()))
            scale = 1 / norm.clamp(min=torch.finfo(norm.dtype).tiny)
        else:  # kl_clip: ν = min(1, √(c / gᵀHg))
            vhv = sum((g * directions[p]).sum() for p, g in grads.items())
            scale = torch.sqrt(self.kl_clip / vhv).clamp(max=1) if vhv > 0 else 1.0
        for d in directions.values():
            d.mul_(scale)

    def _block_direction(self, group: dict, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Update the block's EMAs (and history every T steps); return (g + wd·θ, direction, preconditioned)."""
        st = self.state[params[0]]  # block state lives with the block's first param
        theta = torch.cat([p.reshape(-1) for p in params])  # (d,)
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        if group["weight_decay"] != 0:
            grad = grad.add(theta, alpha=group["weight_decay"])
        if "ema_param" not in st:
            st["mlbfgs_steps"] = 0
            st["ema_param"], st["ema_grad"] = theta.clone(), grad.clone()
            st["hist_s"] = theta.new_zeros(0, theta.numel())  # (k, d), oldest first
            st["hist_y"] = theta.new_zeros(0, theta.numel())  # (k, d)
            st["hist_sy"] = theta.new_zeros(0)  # (k,)
        else:
            st["ema_param"].mul_(group["beta_param"]).add_(theta, alpha=1 - group["beta_param"])
            st["ema_grad"].mul_(group["beta_grad"]).add_(grad, alpha=1 - group["beta_grad"])
        st["mlbfgs_steps"] += 1
        if st["mlbfgs_steps"] % group["update_freq"] == 0:
            self._update_history(group, st, grad)
        if st["hist_sy"].numel() == 0:
            return grad, grad, False
        return grad, _two_loop(grad, st["hist_s"], st["hist_y"], st["hist_sy"]), True

    def _update_history(self, group: dict, st: dict, grad: torch.Tensor) -> None:
        """Form (s, y) from the EMA change since the last snapshot, damp it and push it into the FIFO."""
        if "snap_param" in st:
            s = st["ema_param"] - st["snap_param"]  # (d,)
            y = st["ema_grad"] - st["snap_grad"]  # (d,)
            bp = group["beta_pair"]
            if bp > 0 and "pair_s" in st:
                s, y = (1 - bp) * s + bp * st["pair_s"], (1 - bp) * y + bp * st["pair_y"]
            y_hat = damp_curvature_pair(s, y, group["sigma_low"], group["sigma_high"], group["damping"])
            sy = s.dot(y_hat)
            if torch.isfinite(sy) and sy > group["rho_min"] * s.norm() * y_hat.norm():
                st["pair_s"], st["pair_y"] = s, y
                m = group["history_size"]
                st["hist_s"] = torch.cat([st["hist_s"], s[None]])[-m:]
                st["hist_y"] = torch.cat([st["hist_y"], y_hat[None]])[-m:]
                st["hist_sy"] = torch.cat([st["hist_sy"], sy[None]])[-m:]
        st["snap_param"], st["snap_grad"] = st["ema_param"].clone(), st["ema_grad"].clone()
        if self.refresh_grad_ema:
            st["ema_grad"].copy_(grad)
