"""GEM: Gradient-to-weight ratio and Entropy-guided Masking for sparse fine-tuning.

Paper: Kang, Kim, Avestimehr, Lee, "GEM: A Scale-Aware and Distribution-Sensitive Sparse Fine-Tuning Framework for
Effective Downstream Adaptation", arXiv 2508.16191 (AAAI 2026); official code ``sungminkg/GEM_PEFT``.

GEM trains a fixed, tiny subset of the pretrained weights of some Linear layers. One pass over training data sums
the weight gradients G; each weight is ranked by the relative change it could make, R = |G| / (|W| + eps). A global
budget of ``density * P`` entries is split across layers in proportion to s_l = ||R_l||_F * H(R_l / sum R_l), the
norm of the ratio map times the entropy of its normalised distribution, and each layer keeps its top-n_l entries of
R. The mask is computed once, before training, and never changes.

This module is plain PyTorch (no PEFT): :func:`compute_gem_masks` computes the masks, :class:`GemSparseDeltaLinear`
trains a sparse delta on one Linear, :func:`apply_gem_masks` wraps a model in place. The scoring rules, the official
ablations and our floored variant live in :mod:`leantrain.finetune.gem_scores`, the head warm-up in
:mod:`leantrain.finetune.gem_head_warmup`, mask diagnostics in :mod:`leantrain.finetune.gem_analysis`, the PEFT
tuner in :mod:`leantrain.finetune.peft_tuners.gem`.

Departures from the official code, on purpose:

- Exact top-k per layer (the official ``R >= kth value`` can select a few extra entries on ties).
- Indices are stored as sorted int32 flat positions and trained as a compact value vector, so trainable
  parameters and optimizer state scale with the budget (the official code trains a dense full-size copy).
- The delta is zero-initialised by default. ``init="copy"`` reproduces the official quirk: the trainable tensor
  starts as a copy of W and is added to W, so every selected weight is *doubled* at step 0.
- Scores are computed on whatever loader the caller passes (meant to be the training split; the official code
  draws a separate seed-0 subset that can overlap the dev split), and target names are configurable (the
  official code is hard-wired to ``q_proj``/``v_proj``).
- A layer's count is capped at its size (only reachable with ``budget_base="all_params"`` and a large density).
- With ``modules_to_save`` (a new head), that head is first trained alone for ``head_warmup_steps`` steps, so the
  scoring gradient flows through a trained head (the paper scores through its pretrained LM head; see
  :mod:`leantrain.finetune.gem_head_warmup`). ``head_warmup_steps=0`` scores through the head as built.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leantrain.errors import ConfigError, LeantrainError
from leantrain.finetune.gem_head_warmup import find_head_modules, warm_up_head
from leantrain.finetune.gem_scores import (
    ALLOCATIONS,
    SCORES,
    allocate_budget,  # noqa: F401  (re-exported: callers import it from here)
    entry_scores,
    layer_counts,
    layer_score,
    random_indices,
    top_k_indices,
)

BUDGET_BASES = ("all_params", "target_params")
GRAD_ACCUMULATIONS = ("signed_sum", "abs_sum")
INITS = ("zeros", "copy")
# The paper's targets are q/v projections; BERT-style models call them query/value.
DEFAULT_TARGETS = (("q_proj", "v_proj"), ("query", "value"))

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class GemMaskConfig:
    """How GEM picks its masks (the paper's defaults). :class:`~leantrain.finetune.GemConfig` extends it for PEFT."""

    density: float = field(
        default=1e-3,
        metadata={"help": "Fraction of the budget base that is trainable, in (0, 1]. Paper: 1e-3 (0.1%)."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Linear layers to mask: a list of names (exact or '.'-suffix match) or one regex (full match). "
                "None: the paper's q/v projections ('q_proj','v_proj', or 'query','value' for BERT-style models)."
            )
        },
    )
    budget_base: str = field(
        default="all_params",
        metadata={
            "help": (
                "What the density is a fraction of: 'all_params' (every model parameter, embeddings and head "
                "included; the paper) or 'target_params' (only the target layers' weights)."
            )
        },
    )
    allocation: str = field(
        default="norm_x_entropy",
        metadata={
            "help": (
                "How the budget is split over layers: 'norm_x_entropy' (paper: proportional to ||R||_F * H), "
                "'norm_x_entropy_softmax' (official temp_softmax, off there: (1 + s)^(1/10)), 'norm' (no "
                "entropy: proportional to ||R||_F), 'uniform' (equal counts N // L; the official gradient_masking, "
                "gradweight_masking and random_masking modes) or 'proportional' (ours: to layer size). See "
                "leantrain.finetune.gem_scores."
            )
        },
    )
    score: str = field(
        default="grad_over_weight",
        metadata={
            "help": (
                "Entry score R: 'grad_over_weight' (paper: |G|/(|W|+eps)), 'gradient' (ablation: |G|, used for "
                "the allocation too), 'random' (ablation: random entries from random_seed, counts from the paper's "
                "R) or 'grad_over_weight_floor' (ours: |G|/(max(|W|, weight_floor * mean|W_layer|)+eps)). The "
                "official run modes are these with allocation/init as in gem_scores.OFFICIAL_MODES, e.g. "
                "gradient_masking = score 'gradient' + allocation 'uniform'."
            )
        },
    )
    weight_floor: float = field(
        default=0.1,
        metadata={
            "help": (
                "Ours, only for score='grad_over_weight_floor': c in the denominator max(|W|, c * mean|W_layer|), "
                "a float >= 0. It caps R at |G| / (c * mean|W_layer|) so near-zero weights cannot dominate; 0 "
                "gives the paper's rule. 0.1 floors the smallest few percent of a Gaussian-like layer."
            )
        },
    )
    init: str = field(
        default="zeros",
        metadata={
            "help": (
                "Initial sparse delta: 'zeros' (identity at step 0) or 'copy' (official code: delta = W[idx], so "
                "the selected weights are doubled at step 0)."
            )
        },
    )
    eps: float = field(default=1e-8, metadata={"help": "Guard in |W| + eps and in log(p + eps). Paper: 1e-8."})
    grad_accumulation: str = field(
        default="signed_sum",
        metadata={
            "help": (
                "How batch gradients are combined: 'signed_sum' (paper: sum of signed minibatch gradients) or "
                "'abs_sum' (sum of per-batch |gradient|)."
            )
        },
    )
    random_seed: int = field(default=0, metadata={"help": "Seed of the random-mask ablation (score='random')."})
    score_train_mode: bool = field(
        default=True,
        metadata={"help": "Run the gradient pass in train mode (dropout on), as the official code does."},
    )
    head_warmup_steps: int = field(
        default=20,
        metadata={
            "help": (
                "Ours, not the paper's: before scoring, train only the modules_to_save (a new head) for this many "
                "AdamW steps on the scoring batches, so the gradient flows through a trained head (the paper "
                "scores through its pretrained LM head). An integer >= 0; 0, or no modules_to_save, turns it off."
            )
        },
    )
    head_warmup_lr: float = field(
        default=1e-2,
        metadata={
            "help": (
                "Learning rate of the head warm-up (AdamW, no weight decay), a float > 0. On MiniLM + tweets, 20 "
                "steps at 1e-2 take the new head's loss on unseen batches from 1.10 (ln 3) to 0.94; at 1e-3 to 1.04."
            )
        },
    )

    def __post_init__(self) -> None:
        self.validate_gem()

    def validate_gem(self) -> None:
        """Raise :class:`ConfigError` naming the field, its value and the accepted range."""
        name = type(self).__name__
        if not isinstance(self.density, (int, float)) or not 0.0 < self.density <= 1.0:
            raise ConfigError(f"{name}.density={self.density!r} is invalid; accepted: a float in (0, 1]")
        for fname, choices in (
            ("budget_base", BUDGET_BASES),
            ("allocation", ALLOCATIONS),
            ("score", SCORES),
            ("grad_accumulation", GRAD_ACCUMULATIONS),
            ("init", INITS),
        ):
            value = getattr(self, fname)
            if value not in choices:
                raise ConfigError(f"{name}.{fname}={value!r} is invalid; accepted: one of {', '.join(choices)}")
        if not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ConfigError(f"{name}.eps={self.eps!r} is invalid; accepted: a float > 0")
        if not isinstance(self.weight_floor, (int, float)) or not 0.0 <= self.weight_floor < math.inf:
            raise ConfigError(f"{name}.weight_floor={self.weight_floor!r} is invalid; accepted: a float >= 0")
        steps = self.head_warmup_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"{name}.head_warmup_steps={steps!r} is invalid; accepted: an integer >= 0")
        if not isinstance(self.head_warmup_lr, (int, float)) or not 0.0 < self.head_warmup_lr < math.inf:
            raise ConfigError(f"{name}.head_warmup_lr={self.head_warmup_lr!r} is invalid; accepted: a float > 0")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)


@dataclass
class GemMaskResult:
    """Per-layer GEM masks: sorted int32 flat indices into each target weight, and how they were allocated."""

    indices: dict[str, torch.Tensor]  # name -> (n_l,) int32, sorted
    counts: dict[str, int]  # name -> n_l
    scores: dict[str, float]  # name -> s_l = ||R||_F * H, whatever the allocation; nan/inf for skipped layers
    budget: int  # N_total
    budget_base_params: int  # P the density was applied to
    skipped: list[str] = field(default_factory=list)  # layers with a non-finite score (no budget)
    # the accumulated G of the scoring pass (name -> fp32, the weight's shape), for mask_statistics
    gradients: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    head_warmup_losses: list[float] = field(default_factory=list)  # one per warm-up step; empty without warm-up

    def mask(self, name: str, shape: torch.Size) -> torch.Tensor:
        """Dense bool mask of layer ``name`` with the weight's ``shape``."""
        mask = torch.zeros(math.prod(shape), dtype=torch.bool)
        mask[self.indices[name].long()] = True
        return mask.view(shape)


# ----------------------------------------------------------------------------------------------------------------
# Target selection


def match_target(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches a name exactly or as a '.'-suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_linears(model: nn.Module, targets: list[str] | str | None) -> dict[str, nn.Linear]:
    """Target Linear layers by name; raises :class:`LeantrainError` listing the model's Linear names if none match."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    candidates = [targets] if targets is not None else _default_candidates(model)
    for cand in candidates:
        found = {n: m for n, m in linears.items() if match_target(n, cand)}
        if found:
            return found
    shown = ", ".join(list(linears)[:40]) + (" ..." if len(linears) > 40 else "")
    raise LeantrainError(
        f"GEM target_modules={targets!r} matched no nn.Linear in {type(model).__name__}; set target_modules to "
        f"some of its Linear layers: [{shown}]"
    )


def _default_candidates(model: nn.Module) -> list[list[str]]:
    """A Hugging Face model: PEFT's LoRA default targets for its model_type (the same modules LoRA and PaCA adapt by
    default); otherwise, or if PEFT does not know the type, the paper's q/v names in either spelling."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is not None:
        from leantrain.finetune.target_modules import default_target_modules

        try:
            shared = default_target_modules(model_type)
        except ImportError:  # PEFT absent: the plain-PyTorch path does not need it
            shared = None
        if shared:
            return [shared]
    return [list(t) for t in DEFAULT_TARGETS]


# ----------------------------------------------------------------------------------------------------------------
# Gradient pass


def default_gem_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``out.loss`` when the model returns one, else cross-entropy of the logits against ``batch['labels']``."""
    if not isinstance(batch, Mapping) or "labels" not in batch:
        got = f"keys {sorted(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
        raise ConfigError(
            f"GEM scoring batches must be dicts with a 'labels' entry for the default loss (got {got}); add the "
            "labels to the batches or pass loss_fn(model, batch) -> loss"
        )
    out = model(batch["x"]) if "x" in batch else model(**batch)
    loss = getattr(out, "loss", None)
    if loss is not None:
        return loss
    logits = getattr(out, "logits", out)
    labels = batch["labels"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def scoring_loss(loss_fn: LossFn | None) -> LossFn:
    """``loss_fn`` (default :func:`default_gem_loss`), turning a key the batches lack into a :class:`ConfigError`."""
    if loss_fn is None:
        return default_gem_loss

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        try:
            return loss_fn(model, batch)
        except KeyError as err:
            key = err.args[0] if err.args else None
            if not isinstance(batch, Mapping) or key in batch:
                raise
            raise ConfigError(
                f"GEM scoring batches lack the entry {key!r} that loss_fn reads (they have {sorted(batch)}); pass "
                "batches that contain it"
            ) from None

    return loss


def accumulate_gradients(
    model: nn.Module,
    dataloader: Iterable[dict[str, torch.Tensor]],
    targets: dict[str, nn.Linear],
    loss_fn: LossFn,
    absolute: bool = False,
    train_mode: bool = True,
) -> dict[str, torch.Tensor]:
    """One pass over ``dataloader``; returns per-target fp32 sums of weight gradients. The model is left as found."""
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    target_weights = {id(m.weight) for m in targets.values()}
    G = {n: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device) for n, m in targets.items()}
    batches = 0
    try:
        # Only the target weights need gradients; freezing the rest saves work and leaves their .grad untouched.
        for p in params:
            p.requires_grad_(id(p) in target_weights)
            p.grad = None
        model.train(train_mode)
        for batch in dataloader:
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise LeantrainError(f"GEM gradient pass: non-finite loss {loss.item()} at batch {batches}")
            loss.backward()
            for n, m in targets.items():
                if m.weight.grad is not None:
                    g = m.weight.grad.detach().float()
                    G[n] += g.abs() if absolute else g
                    m.weight.grad = None
            batches += 1
    finally:
        for p, flag, grad in zip(params, saved_flags, saved_grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    if batches == 0:
        raise LeantrainError("GEM gradient pass: the dataloader yielded no batches")
    for n, g in G.items():
        if not bool(g.any()):
            raise LeantrainError(
                f"GEM target layer {n!r} received no gradient from the loss (None or all zero); it does not "
                "influence the loss on these batches. Remove it from target_modules."
            )
    return G


# ----------------------------------------------------------------------------------------------------------------
# Masks


def compute_gem_masks(
    model: nn.Module,
    dataloader: Iterable[dict[str, torch.Tensor]],
    config: Any = None,
    loss_fn: LossFn | None = None,
    head_modules: Sequence[str] | None = None,
) -> GemMaskResult:
    """GEM masks for the target Linear layers of ``model`` from one gradient pass over ``dataloader``.

    ``config`` is a :class:`GemMaskConfig` (or the PEFT ``GemConfig``, which extends it); ``loss_fn(model, batch)``
    defaults to :func:`default_gem_loss`. ``head_modules`` (default: the config's ``modules_to_save``) are trained
    alone for ``config.head_warmup_steps`` steps first and stay trained; everything else (weights, requires_grad
    flags, grads, train/eval mode) is left as found.
    """
    config = config if config is not None else GemMaskConfig()
    targets = find_target_linears(model, config.target_modules)
    loss = scoring_loss(loss_fn)
    head_names = head_modules if head_modules is not None else getattr(config, "modules_to_save", None)
    warmup_losses: list[float] = []
    if head_names and config.head_warmup_steps > 0:
        dataloader = dataloader if isinstance(dataloader, (list, tuple)) else list(dataloader)  # iterated twice
        heads = find_head_modules(model, list(head_names))
        warmup_losses = warm_up_head(
            model, dataloader, heads, config.head_warmup_steps, config.head_warmup_lr, loss, config.score_train_mode
        )
    # fp32 snapshot: in half precision many small weights round to 0 and would dominate R.
    W0 = {n: m.weight.detach().float().clone() for n, m in targets.items()}
    G = accumulate_gradients(
        model,
        dataloader,
        targets,
        loss,
        absolute=config.grad_accumulation == "abs_sum",
        train_mode=config.score_train_mode,
    )
    if config.budget_base == "all_params":
        base_params = sum(p.numel() for p in model.parameters())
    else:
        base_params = sum(w.numel() for w in W0.values())
    budget = int(config.density * base_params)

    R = entry_scores(G, W0, config.score, config.eps, config.weight_floor)
    scores = {n: layer_score(r, config.eps) for n, r in R.items()}
    counts = layer_counts(config.allocation, budget, R, scores)
    if sum(counts.values()) == 0:
        raise LeantrainError(
            f"GEM density={config.density} gives a budget of {budget} entries, too few for any target layer; "
            "raise the density"
        )
    if config.score == "random":
        indices = random_indices(counts, {n: r.numel() for n, r in R.items()}, config.random_seed)
    else:
        indices = {n: top_k_indices(r, counts[n]).cpu() for n, r in R.items()}
    skipped = [n for n, s in scores.items() if not math.isfinite(s)]
    return GemMaskResult(indices, counts, scores, budget, base_params, skipped, G, warmup_losses)


# ----------------------------------------------------------------------------------------------------------------
# Sparse delta on a Linear


def scatter_delta(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """W + delta, delta zero except ``values`` at flat ``indices``; out of place, differentiable in ``values``."""
    flat = weight.reshape(-1).index_add(0, indices.long(), values.to(weight.dtype))  # (out*in,)
    return flat.view_as(weight)


def init_values(weight: torch.Tensor, indices: torch.Tensor, init: str) -> torch.Tensor:
    """fp32 starting delta: zeros, or W[idx] (the official code's copy init)."""
    if init == "copy":
        return weight.detach().reshape(-1)[indices.long()].float().clone()
    return torch.zeros(indices.numel(), dtype=torch.float32, device=weight.device)


class GemSparseDeltaLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable sparse delta at fixed flat positions: y = x (W + S(values))^T + b."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor, init: str = "zeros") -> None:
        super().__init__()
        if init not in INITS:
            raise ConfigError(f"GemSparseDeltaLinear init={init!r} is invalid; accepted: one of {', '.join(INITS)}")
        self.base = base
        base.requires_grad_(False)
        self.register_buffer("gem_indices", indices.to(device=base.weight.device, dtype=torch.int32))
        self.gem_values = nn.Parameter(init_values(base.weight, self.gem_indices, init))
        self.merged = False

    def get_delta_weight(self) -> torch.Tensor:
        """Dense (out, in) delta, zero outside the mask."""
        return scatter_delta(torch.zeros_like(self.base.weight), self.gem_indices, self.gem_values)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the delta into the base weight (forward then uses the base layer alone)."""
        if not self.merged:
            self.base.weight.view(-1).index_add_(0, self.gem_indices.long(), self.gem_values.to(self.base.weight))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta from the base weight again."""
        if self.merged:
            self.base.weight.view(-1).index_add_(0, self.gem_indices.long(), -self.gem_values.to(self.base.weight))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return F.linear(x, scatter_delta(self.base.weight, self.gem_indices, self.gem_values), self.base.bias)

    def extra_repr(self) -> str:
        return f"trainable={self.gem_indices.numel()} of {self.base.weight.numel()}"


def apply_gem_masks(model: nn.Module, masks: GemMaskResult, init: str = "zeros") -> nn.Module:
    """Replace each masked Linear of ``model`` by a :class:`GemSparseDeltaLinear` in place; freeze everything else."""
    model.requires_grad_(False)
    for name, idx in masks.indices.items():
        if idx.numel() == 0:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, GemSparseDeltaLinear(getattr(parent, child), idx, init=init))
    return model
