"""GEM's score and allocation choices against hand computations on a tiny MLP: the paper's rule, the official
ablations (gem_scores.OFFICIAL_MODES) and our floored ratio."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gem_tiny import MLP_TARGETS as TARGETS
from gem_tiny import batches, mlp
from torch import nn

from leantrain.errors import ConfigError
from leantrain.finetune.gem import GemMaskConfig, compute_gem_masks
from leantrain.finetune.gem_scores import (
    ALLOCATIONS,
    OFFICIAL_MODES,
    SCORES,
    SOFTMAX_TEMPERATURE,
    entry_scores,
    layer_counts,
)


def hand_grads(model: nn.Module, data) -> dict[str, torch.Tensor]:
    """Sum over batches of the CE-loss weight gradient of each target layer."""
    G = {n: torch.zeros_like(model.get_submodule(n).weight) for n in TARGETS}
    for b in data:
        model.zero_grad()
        F.cross_entropy(model(b["x"]), b["labels"]).backward()
        for n in TARGETS:
            G[n] += model.get_submodule(n).weight.grad
    model.zero_grad(set_to_none=True)
    return G


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach() for n in TARGETS}


def hand_entropy_score(R: torch.Tensor, eps: float = 1e-8) -> float:
    r = R.double().flatten()
    p = r / r.sum()
    return float(r.norm() * -(p * torch.log(p + eps)).sum())


def top(R: torch.Tensor, k: int) -> set[int]:
    return set(torch.topk(R.flatten(), k).indices.tolist())


def masks(model, data, **kwargs):
    return compute_gem_masks(model, data, GemMaskConfig(target_modules=TARGETS, **kwargs))


# ----------------------------------------------------------------------------------------------------------------
# Allocations


def test_uniform_gives_equal_counts_floor_of_budget_over_layers():
    model, data = mlp(), batches()
    res = masks(model, data, density=0.07, allocation="uniform")  # 1,459 params -> budget 102, not divisible by 3
    assert res.budget == int(0.07 * sum(p.numel() for p in model.parameters())) and res.budget % 3 != 0
    assert res.counts == dict.fromkeys(TARGETS, res.budget // 3)
    # integer division, not int(N * (1/L)): 98 * (1/49) < 2 in floating point
    R = {str(i): torch.ones(10) for i in range(49)}
    assert set(layer_counts("uniform", 98, R, dict.fromkeys(R, 1.0)).values()) == {2}


def test_norm_allocation_is_proportional_to_ratio_norm():
    model, data = mlp(), batches()
    res = masks(model, data, density=0.05, allocation="norm")
    G, W = hand_grads(model, data), weights(model)
    norms = {n: float((G[n].abs() / (W[n].abs() + 1e-8)).double().norm()) for n in TARGETS}
    total = sum(norms.values())
    assert res.counts == {n: int(res.budget * (norms[n] / total)) for n in TARGETS}
    gem = masks(model, data, density=0.05)
    assert res.counts != gem.counts  # the entropy factor matters on this model


def test_softmax_allocation_uses_official_temperature():
    model, data = mlp(), batches()
    res = masks(model, data, density=0.05, allocation="norm_x_entropy_softmax")
    G, W = hand_grads(model, data), weights(model)
    s = {n: hand_entropy_score(G[n].abs() / (W[n].abs() + 1e-8)) for n in TARGETS}
    w = {n: (1 + s[n]) ** (1 / SOFTMAX_TEMPERATURE) for n in TARGETS}
    assert res.counts == {n: int(res.budget * (w[n] / sum(w.values()))) for n in TARGETS}


# ----------------------------------------------------------------------------------------------------------------
# Scores


def test_gradient_only_with_equal_counts_picks_top_abs_gradient():
    model, data = mlp(), batches()
    res = masks(model, data, density=0.05, score="gradient", allocation="uniform")
    G = hand_grads(model, data)
    for n in TARGETS:
        assert set(res.indices[n].tolist()) == top(G[n].abs(), res.budget // 3)


def test_floored_ratio_equals_paper_rule_when_every_weight_is_above_the_floor():
    model, data = mlp(), batches()
    with torch.no_grad():  # |W| in [0.05, 0.15]: mean ~0.1, so the floor 0.1 * mean ~0.01 is below every |W|
        for n in TARGETS:
            w = model.get_submodule(n).weight
            w.copy_(torch.sign(w) * (0.05 + 0.1 * torch.rand(w.shape)))
    paper = masks(model, data, density=0.05)
    floored = masks(model, data, density=0.05, score="grad_over_weight_floor", weight_floor=0.1)
    assert paper.counts == floored.counts and paper.scores == floored.scores
    assert all(torch.equal(paper.indices[n], floored.indices[n]) for n in TARGETS)
    zero_floor = masks(mlp(), data, density=0.05, score="grad_over_weight_floor", weight_floor=0.0)
    assert zero_floor.scores == masks(mlp(), data, density=0.05).scores


def test_floored_ratio_caps_near_zero_weights():
    model, data = mlp(), batches()
    g = hand_grads(mlp(), data)["2"].abs().flatten()
    weak = torch.nonzero((g > 0) & (g < g[g > 0].median())).flatten()[:10]  # small but nonzero gradients
    with torch.no_grad():
        model[2].weight.view(-1)[weak] = 1e-7  # near-zero weights: the paper's R ranks them first anyway
    G, W = hand_grads(model, data), weights(model)
    c = 0.1
    R = entry_scores(G, W, "grad_over_weight_floor", 1e-8, weight_floor=c)
    for n in TARGETS:
        floor = c * float(W[n].abs().double().mean())
        torch.testing.assert_close(R[n], G[n].abs() / (W[n].abs().clamp_min(floor) + 1e-8), rtol=0, atol=0)
        assert float(R[n].max()) <= float(G[n].abs().max()) / floor * (1 + 1e-6)
    paper = masks(model, data, density=0.05, allocation="uniform")
    floored = masks(model, data, density=0.05, allocation="uniform", score="grad_over_weight_floor")
    weak = set(weak.tolist())
    assert weak <= set(paper.indices["2"].tolist())
    assert set(floored.indices["2"].tolist()) == top(R["2"], paper.budget // 3)
    assert not weak & set(floored.indices["2"].tolist())


def test_random_with_uniform_allocation_is_the_official_random_masking():
    model, data = mlp(), batches()
    res = masks(model, data, density=0.05, **{k: v for k, v in OFFICIAL_MODES["random_masking"].items()})
    assert res.counts == dict.fromkeys(TARGETS, res.budget // 3)
    assert all(len(set(res.indices[n].tolist())) == res.counts[n] for n in TARGETS)


@pytest.mark.parametrize("mode", sorted(OFFICIAL_MODES))
def test_official_modes_are_valid_settings(mode):
    settings = OFFICIAL_MODES[mode]
    assert settings["score"] in SCORES and settings["allocation"] in ALLOCATIONS
    cfg = GemMaskConfig(target_modules=TARGETS, density=0.05, **settings)
    res = compute_gem_masks(mlp(), batches(), cfg)
    if settings["allocation"] == "uniform":
        assert len(set(res.counts.values())) == 1
    if mode == "gradweight_masking":  # GEM without the entropy allocation: top-R with equal counts
        model = mlp()
        G, W = hand_grads(model, batches()), weights(model)
        for n in TARGETS:
            assert set(res.indices[n].tolist()) == top(G[n].abs() / (W[n].abs() + 1e-8), res.counts[n])


@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        ({"weight_floor": -0.1}, "weight_floor"),
        ({"weight_floor": math.inf}, "weight_floor"),
        ({"head_warmup_steps": -1}, "head_warmup_steps"),
        ({"head_warmup_steps": 2.5}, "head_warmup_steps"),
        ({"head_warmup_lr": 0.0}, "head_warmup_lr"),
        ({"score": "weight"}, "score"),
        ({"allocation": "entropy"}, "allocation"),
    ],
)
def test_new_fields_are_validated(kwargs, field_name):
    with pytest.raises(ConfigError, match=rf"GemMaskConfig\.{field_name}=.*accepted"):
        GemMaskConfig(**kwargs)
