"""How GEM ranks weight entries and splits its budget over layers: the paper's rule, the official ablations, ours.

Paper: Kang, Kim, Avestimehr, Lee, "GEM: A Scale-Aware and Distribution-Sensitive Sparse Fine-Tuning Framework for
Effective Downstream Adaptation", arXiv 2508.16191 (AAAI 2026). Official code ``sungminkg/GEM_PEFT`` (release
590f44c): ``run.py`` (``Framework.backward_qv_pass``, ``Framework.load_model``), ``PEFT/entropy_masking.py``
(``EntropyBasedMasking``: GEM, run mode ``entropy_gradweight_masking``), ``PEFT/gradweight_masking.py``
(``GradWeightMasking``: the modes ``gradient_masking`` and ``gradweight_masking``), ``PEFT/random_masking.py``
(``RandomMasking``: mode ``random_masking``).

GEM ranks every entry of a target weight by a score map R (``score``) and splits a global budget N over the layers
by a per-layer weight (``allocation``); each layer then keeps its top-n_l entries of R.

Entry scores, G the summed gradient of the scoring pass, W the weight at scoring time:

- ``grad_over_weight`` (paper): R = |G| / (|W| + eps). Official: ``EntropyMaskingLinear.apply_mask`` and
  ``GradWeightMaskingLinear.apply_mask(mask_mode="gradweight")``.
- ``gradient`` (ablation): R = |G|. Official: ``GradWeightMaskingLinear.apply_mask(mask_mode="gradient")``.
- ``random`` (ablation): positions drawn uniformly per layer (seeded here, global RNG in the official
  ``RandomMaskingLinear.set_mask``); the allocation, if it needs one, uses the paper's R.
- ``grad_over_weight_floor`` (ours, not in the paper or the official code): R = |G| / (max(|W|, c * mean|W_l|) +
  eps), c = ``weight_floor``. It keeps the paper's "update relative to the weight's scale" but caps R at
  |G| / (c * mean|W_l|), so near-zero weights (whose R explodes, and which the paper's rule then picks first)
  compete on their gradient. It equals the paper's rule exactly when every |W| is at or above the floor (or c = 0).

Allocations, s_l = ||R_l||_F * H(R_l / sum R_l) (natural log, eps inside the log):

- ``norm_x_entropy`` (paper): n_l = floor(N * s_l / sum s). Official: ``EntropyBasedMasking`` with
  ``ratio_mode="naive"``.
- ``norm_x_entropy_softmax``: weights (1 + s_l)^(1/T), T = 10. Official: ``ratio_mode="temp_softmax"``, present
  in ``EntropyBasedMasking`` but switched off.
- ``norm`` (no entropy): n_l proportional to ||R_l||_F. Official: only a commented-out alternative
  (``# entropy_score = layer_norm``) in the pre-release ``PEFT/entropy_masking.py`` (commit 2bd0927); no run
  mode uses it.
- ``uniform`` (equal counts per layer): n_l = floor(N / L) for L target layers. Official: the ``gradient_masking``,
  ``gradweight_masking`` and ``random_masking`` modes (``GradWeightMasking._tuning_params_per_module``,
  ``RandomMasking``: ``total_tuning_params // (num_layers * 2)``).
- ``proportional`` (ours): n_l proportional to the layer's size; the official code has no such mode.

Layers whose s_l is NaN or infinite get no budget (official: ``EntropyBasedMasking`` skips them), and a count is
capped at its layer's size. :data:`OFFICIAL_MODES` lists the official run modes as settings of these fields.
"""

from __future__ import annotations

import math

import torch

from leantrain.errors import LeantrainError

SCORES = ("grad_over_weight", "gradient", "random", "grad_over_weight_floor")
ALLOCATIONS = ("norm_x_entropy", "norm_x_entropy_softmax", "norm", "uniform", "proportional")
SOFTMAX_TEMPERATURE = 10.0  # official EntropyBasedMasking.temperature

# Official run modes (run.sh MODE=...) as (score, allocation, init). What settings cannot express: the official
# gradient_masking/gradweight_masking modes never freeze anything (GradWeightMasking sets no requires_grad, and
# backward_qv_pass has just set every parameter trainable), so besides the masked delta the whole model trains;
# here only the masked entries train (plus modules_to_save), as the paper describes the ablations.
OFFICIAL_MODES: dict[str, dict[str, str]] = {
    "entropy_gradweight_masking": {"score": "grad_over_weight", "allocation": "norm_x_entropy", "init": "copy"},
    "gradweight_masking": {"score": "grad_over_weight", "allocation": "uniform", "init": "copy"},
    "gradient_masking": {"score": "gradient", "allocation": "uniform", "init": "copy"},
    "random_masking": {"score": "random", "allocation": "uniform", "init": "zeros"},
    # pre-release mode (run.py of commit 0e57d95, dropped from the release): EntropyBasedMasking(mask_mode="gradient")
    "entropy_gradient_masking": {"score": "gradient", "allocation": "norm_x_entropy", "init": "copy"},
}


def entry_scores(
    G: dict[str, torch.Tensor], W: dict[str, torch.Tensor], score: str, eps: float, weight_floor: float = 0.1
) -> dict[str, torch.Tensor]:
    """Score map R per layer (fp32, the weight's shape); ``random`` gets the paper's R, which its allocation uses."""
    R = {}
    for name, g in G.items():
        w = W[name].abs()
        if score == "gradient":
            R[name] = g.abs()
        elif score == "grad_over_weight_floor":
            floor = weight_floor * float(w.double().mean())
            R[name] = g.abs() / (w.clamp_min(floor) + eps)
        else:
            R[name] = g.abs() / (w + eps)
    return R


def layer_score(R: torch.Tensor, eps: float) -> float:
    """s = ||R||_F * H(p), p = R / sum R, H = -sum p log(p + eps) (natural log); float64 sums."""
    r = R.double().flatten()
    p = r / r.sum()
    entropy = -(p * torch.log(p + eps)).sum()
    return float(torch.linalg.vector_norm(r) * entropy)


def allocation_weights(allocation: str, R: dict[str, torch.Tensor], scores: dict[str, float]) -> dict[str, float]:
    """Per-layer weight the budget is split by; NaN for layers with a non-finite s_l (they get nothing)."""
    weights = {}
    for name, s in scores.items():
        if not math.isfinite(s):
            weights[name] = math.nan
        elif allocation == "norm_x_entropy":
            weights[name] = s
        elif allocation == "norm_x_entropy_softmax":
            weights[name] = math.exp(math.log1p(s) / SOFTMAX_TEMPERATURE)
        elif allocation == "norm":
            weights[name] = float(torch.linalg.vector_norm(R[name].double()))
        elif allocation == "proportional":
            weights[name] = float(R[name].numel())
        else:
            weights[name] = 1.0
    return weights


def allocate_budget(budget: int, weights: dict[str, float], sizes: dict[str, int]) -> dict[str, int]:
    """n_l = floor(budget * w_l / sum w) over finite weights (official ``int(N * b_l)``), capped at layer size."""
    finite = {n: w for n, w in weights.items() if math.isfinite(w)}
    total = sum(finite.values())
    if not finite or not total > 0:
        raise LeantrainError(f"GEM allocation: no layer has a finite positive score ({weights})")
    return {n: min(int(budget * (finite[n] / total)), sizes[n]) if n in finite else 0 for n in weights}


def layer_counts(allocation: str, budget: int, R: dict[str, torch.Tensor], scores: dict[str, float]) -> dict[str, int]:
    """n_l per layer under ``allocation``; ``uniform`` is the official integer division ``N // L``."""
    sizes = {n: r.numel() for n, r in R.items()}
    if allocation == "uniform":
        per_layer = budget // len(R)
        return {n: min(per_layer, sizes[n]) if math.isfinite(scores[n]) else 0 for n in R}
    return allocate_budget(budget, allocation_weights(allocation, R, scores), sizes)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted int32 flat positions of exactly ``k`` largest entries (ties broken by torch.topk)."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.int32, device=scores.device)
    idx = torch.topk(scores.flatten(), k, sorted=False).indices
    return torch.sort(idx).values.to(torch.int32)


def random_indices(counts: dict[str, int], sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Sorted int32 positions drawn uniformly without replacement, one generator over the layers in order."""
    gen = torch.Generator().manual_seed(int(seed))
    return {n: torch.sort(torch.randperm(sizes[n], generator=gen)[: counts[n]]).values.to(torch.int32) for n in counts}
