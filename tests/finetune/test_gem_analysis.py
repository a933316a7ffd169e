"""mask_statistics on a hand-built case, on masks from compute_gem_masks (whose gradients it reuses), and on a model
wrapped by apply_gem_masks or apply_gem."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from gem_tiny import MLP_TARGETS as TARGETS
from gem_tiny import batches, mlp

from leantrain.errors import LeantrainError
from leantrain.finetune.gem import GemMaskConfig, apply_gem_masks, compute_gem_masks
from leantrain.finetune.gem_analysis import mask_statistics


def hand_case():
    W = {
        "a": (torch.arange(1, 21, dtype=torch.float32) / 100).view(4, 5),  # |W| 0.01 .. 0.20
        "b": torch.tensor([0.5, 0.05, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0, 0.2]).view(2, 5),
    }
    G = {"a": torch.ones(4, 5), "b": torch.tensor([4.0, -1, 0, 0, 0, 0, 0, 0, 0, 1]).view(2, 5)}
    G["a"].view(-1)[0] = -3.0
    picks = {"a": torch.tensor([0, 1, 10, 19], dtype=torch.int32), "b": torch.tensor([1], dtype=torch.int32)}
    return W, G, picks


def test_hand_built_case():
    W, G, picks = hand_case()
    stats = mask_statistics(W, G, picks)
    # smallest decile: a (20 entries) -> |W| <= 0.02, picks 0 and 1; b (10 entries) -> its minimum 0.05, picked
    assert stats["picks"] == 5 and stats["entries"] == 30
    assert stats["smallest_decile_share"] == pytest.approx(3 / 5)
    assert stats["median_abs_weight_picks"] == pytest.approx(0.05)  # of 0.01, 0.02, 0.05, 0.11, 0.20
    assert stats["median_abs_weight_all"] == pytest.approx((0.14 + 0.15) / 2)  # 15th and 16th of 30 values
    assert stats["grad_mass_captured"] == pytest.approx((3 + 1 + 1 + 1 + 1) / (22 + 6))
    assert stats["grad_mass_top_gradient"] == pytest.approx((3 + 1 + 1 + 1 + 4) / (22 + 6))
    assert stats["per_layer"] == {
        "a": {"count": 4, "smallest_decile_share": 0.5, "grad_mass_captured": pytest.approx(6 / 22)},
        "b": {"count": 1, "smallest_decile_share": 1.0, "grad_mass_captured": pytest.approx(1 / 6)},
    }
    json.dumps(stats)  # plain numbers only
    dense = {n: torch.zeros(W[n].numel(), dtype=torch.bool).index_fill_(0, p.long(), True) for n, p in picks.items()}
    assert mask_statistics(W, G, {n: m.view_as(W[n]) for n, m in dense.items()}) == stats
    with pytest.raises(LeantrainError, match="no mask for layers"):
        mask_statistics(W, G, {"a": picks["a"]})


def test_result_keeps_the_scoring_gradients_and_statistics_compare_masks():
    model, data = mlp(), batches()
    common = dict(density=0.05, target_modules=TARGETS, allocation="uniform")
    gem = compute_gem_masks(model, data, GemMaskConfig(**common))
    grad = compute_gem_masks(model, data, GemMaskConfig(**common, score="gradient"))
    reference = copy.deepcopy(model)
    for b in data:
        F.cross_entropy(reference(b["x"]), b["labels"]).backward()
    for n in TARGETS:
        torch.testing.assert_close(gem.gradients[n], reference.get_submodule(n).weight.grad)
    s_gem, s_grad = mask_statistics(model, gem.gradients, gem), mask_statistics(model, grad.gradients, grad)
    assert s_grad["grad_mass_captured"] == pytest.approx(s_grad["grad_mass_top_gradient"])  # top-|G| is optimal
    assert s_gem["grad_mass_captured"] < s_grad["grad_mass_captured"]
    assert s_gem["median_abs_weight_picks"] < s_grad["median_abs_weight_picks"]
    assert s_gem["smallest_decile_share"] > s_grad["smallest_decile_share"]
    wrapped = apply_gem_masks(copy.deepcopy(model), gem)  # reads the base weight through the wrapper
    assert mask_statistics(wrapped, gem.gradients, gem) == s_gem
    wrapped.get_submodule("2").merge()
    with pytest.raises(LeantrainError, match="merged"):
        mask_statistics(wrapped, gem.gradients, gem)


def test_statistics_of_an_apply_gem_peft_model():
    pytest.importorskip("peft")
    from leantrain.finetune.peft_tuners.gem import GemConfig, apply_gem

    model, data = mlp(), batches()
    plain = compute_gem_masks(copy.deepcopy(model), data, GemMaskConfig(density=0.05, target_modules=TARGETS))
    peft_model = apply_gem(model, data, GemConfig(density=0.05, target_modules=TARGETS))
    masks = peft_model.gem_masks
    assert mask_statistics(peft_model, masks.gradients, masks) == mask_statistics(mlp(), plain.gradients, plain)
