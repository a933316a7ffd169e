"""GEM core (no PEFT): mask computation against an independent recomputation, allocation rule, ablations, and the
GemSparseDeltaLinear sparse delta (only masked entries can change; state scales with the budget)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from gem_tiny import MLP_TARGETS as TARGETS
from gem_tiny import batches, mlp
from torch import nn

from leantrain.errors import ConfigError, LeantrainError
from leantrain.finetune.gem import (
    GemMaskConfig,
    GemSparseDeltaLinear,
    allocate_budget,
    apply_gem_masks,
    compute_gem_masks,
)


def manual_grad_sum(model: nn.Module, data, names, absolute: bool = False) -> dict[str, torch.Tensor]:
    """Independent gradient pass: sum of per-batch weight gradients of CE loss."""
    model = copy.deepcopy(model)
    mods = dict(model.named_modules())
    G = {n: torch.zeros_like(mods[n].weight) for n in names}
    for b in data:
        model.zero_grad()
        F.cross_entropy(model(b["x"]), b["labels"]).backward()
        for n in names:
            g = mods[n].weight.grad
            G[n] += g.abs() if absolute else g
    return G


def manual_ratio(model, data, names, eps=1e-8):
    mods = dict(model.named_modules())
    G = manual_grad_sum(model, data, names)
    return {n: G[n].abs() / (mods[n].weight.detach().abs() + eps) for n in names}


def hand_score(R: torch.Tensor, eps: float = 1e-8) -> float:
    r = R.double().flatten()
    p = r / r.sum()
    return float(r.norm() * -(p * torch.log(p + eps)).sum())


def selected_set(idx: torch.Tensor) -> set[int]:
    return set(idx.tolist())


# ----------------------------------------------------------------------------------------------------------------
# Masks


def test_allocation_follows_norm_times_entropy_rule():
    model, data = mlp(), batches()
    cfg = GemMaskConfig(density=0.05, target_modules=TARGETS)
    res = compute_gem_masks(model, data, cfg)
    R = manual_ratio(model, data, TARGETS)
    s = {n: hand_score(R[n]) for n in TARGETS}
    n_total = int(0.05 * sum(p.numel() for p in model.parameters()))
    assert res.budget == n_total
    for n in TARGETS:
        assert res.scores[n] == pytest.approx(s[n], rel=1e-5)
        assert res.counts[n] == int(n_total * (s[n] / sum(s.values())))
        assert res.indices[n].dtype == torch.int32 and res.indices[n].numel() == res.counts[n]
        assert torch.equal(res.indices[n], res.indices[n].sort().values)
    assert sum(res.counts.values()) <= n_total


def test_selected_entries_are_exact_top_k_of_ratio():
    model, data = mlp(), batches()
    res = compute_gem_masks(model, data, GemMaskConfig(density=0.05, target_modules=TARGETS))
    R = manual_ratio(model, data, TARGETS)
    for n in TARGETS:
        flat = R[n].flatten()
        chosen = res.mask(n, R[n].shape).flatten()
        assert int(chosen.sum()) == res.counts[n]  # no duplicates, no tie overflow
        assert flat[chosen].min() >= flat[~chosen].max() * (1 - 1e-5)
        assert selected_set(res.indices[n]) == selected_set(torch.topk(flat, res.counts[n]).indices)


def test_budget_base_and_other_allocations():
    model, data = mlp(), batches()
    sizes = {n: dict(model.named_modules())[n].weight.numel() for n in TARGETS}
    res = compute_gem_masks(
        model, data, GemMaskConfig(density=0.1, target_modules=TARGETS, budget_base="target_params")
    )
    assert res.budget == int(0.1 * sum(sizes.values())) and res.budget_base_params == sum(sizes.values())
    res = compute_gem_masks(model, data, GemMaskConfig(density=0.1, target_modules=TARGETS, allocation="uniform"))
    assert set(res.counts.values()) == {res.budget // 3}
    res = compute_gem_masks(model, data, GemMaskConfig(density=0.1, target_modules=TARGETS, allocation="proportional"))
    total = sum(sizes.values())
    assert res.counts == {n: int(res.budget * (sizes[n] / total)) for n in TARGETS}


def test_non_finite_scores_get_no_budget():
    counts = allocate_budget(100, {"a": 1.0, "b": math.nan, "c": 3.0, "d": math.inf}, dict.fromkeys("abcd", 1000))
    assert counts == {"a": 25, "b": 0, "c": 75, "d": 0}
    assert allocate_budget(100, {"a": 1.0}, {"a": 10}) == {"a": 10}  # capped at the layer size


def test_gradient_only_ablation_ranks_by_abs_gradient():
    model, data = mlp(), batches()
    res = compute_gem_masks(model, data, GemMaskConfig(density=0.05, target_modules=TARGETS, score="gradient"))
    G = manual_grad_sum(model, data, TARGETS)
    s = {n: hand_score(G[n].abs()) for n in TARGETS}
    for n in TARGETS:
        assert res.counts[n] == int(res.budget * (s[n] / sum(s.values())))
        assert selected_set(res.indices[n]) == selected_set(torch.topk(G[n].abs().flatten(), res.counts[n]).indices)


def test_abs_sum_accumulation_uses_per_batch_magnitudes():
    model, data = mlp(), batches()
    cfg = GemMaskConfig(density=0.05, target_modules=TARGETS, grad_accumulation="abs_sum")
    res = compute_gem_masks(model, data, cfg)
    mods = dict(model.named_modules())
    G = manual_grad_sum(model, data, TARGETS, absolute=True)
    for n in TARGETS:
        R = (G[n] / (mods[n].weight.detach().abs() + 1e-8)).flatten()
        assert selected_set(res.indices[n]) == selected_set(torch.topk(R, res.counts[n]).indices)


def test_random_mask_same_counts_differs_from_gem_and_is_seeded():
    model, data = mlp(), batches()
    gem = compute_gem_masks(model, data, GemMaskConfig(density=0.05, target_modules=TARGETS))
    rnd = [
        compute_gem_masks(
            model, data, GemMaskConfig(density=0.05, target_modules=TARGETS, score="random", random_seed=s)
        )
        for s in (7, 7, 8)
    ]
    assert rnd[0].counts == gem.counts
    assert any(not torch.equal(rnd[0].indices[n], gem.indices[n]) for n in TARGETS)
    assert all(torch.equal(rnd[0].indices[n], rnd[1].indices[n]) for n in TARGETS)
    assert any(not torch.equal(rnd[0].indices[n], rnd[2].indices[n]) for n in TARGETS)
    assert all(len(set(rnd[0].indices[n].tolist())) == rnd[0].counts[n] for n in TARGETS)


def test_gem_prefers_smaller_weights_than_gradient_masks():
    """Spec check (d): dividing by |W| moves the mask towards small-magnitude weights."""
    model, data = mlp(), batches()
    mods = dict(model.named_modules())
    common = dict(density=0.05, target_modules=TARGETS, allocation="uniform")
    gem = compute_gem_masks(model, data, GemMaskConfig(**common))
    grad = compute_gem_masks(model, data, GemMaskConfig(**common, score="gradient"))

    def mean_abs_w(res):
        return torch.cat([mods[n].weight.detach().abs().flatten()[res.indices[n].long()] for n in TARGETS]).mean()

    assert mean_abs_w(gem) < 0.5 * mean_abs_w(grad)


def test_model_is_left_unchanged():
    model, data = mlp(), batches()
    model.eval()
    model[6].requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    compute_gem_masks(model, data, GemMaskConfig(density=0.05, target_modules=TARGETS))
    assert not model.training
    assert not model[6].weight.requires_grad and model[0].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layer_without_gradient_is_named_in_the_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(12, 3)
            self.dead = nn.Linear(12, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(LeantrainError, match="'dead'"):
        compute_gem_masks(Branchy(), batches(), GemMaskConfig(density=0.1, target_modules=["used", "dead"]))


def test_unmatched_targets_list_the_linear_names():
    with pytest.raises(LeantrainError, match=r"matched no nn.Linear.*\[0, 2, 4, 6\]"):
        compute_gem_masks(mlp(), batches(), GemMaskConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize(
    "kwargs, field_name",
    [({"density": 0.0}, "density"), ({"density": 1.5}, "density"), ({"allocation": "softmax"}, "allocation")],
)
def test_config_validation_names_field(kwargs, field_name):
    with pytest.raises(ConfigError, match=rf"GemMaskConfig\.{field_name}=.*accepted"):
        GemMaskConfig(**kwargs)


def test_batches_without_labels_are_a_config_error():
    unlabeled = [{"x": b["x"]} for b in batches()]
    with pytest.raises(ConfigError, match=r"must be dicts with a 'labels' entry.*got keys \['x'\].*pass loss_fn"):
        compute_gem_masks(mlp(), unlabeled, GemMaskConfig(density=0.05, target_modules=TARGETS))
    with pytest.raises(ConfigError, match=r"got a tuple"):
        compute_gem_masks(mlp(), [(b["x"],) for b in batches()], GemMaskConfig(density=0.05, target_modules=TARGETS))

    def reads_targets(model, batch):
        return F.cross_entropy(model(batch["x"]), batch["targets"])

    with pytest.raises(ConfigError, match=r"lack the entry 'targets' that loss_fn reads \(they have \['x'\]\)"):
        compute_gem_masks(mlp(), unlabeled, GemMaskConfig(density=0.05, target_modules=TARGETS), reads_targets)
    relabeled = [{"x": b["x"], "targets": b["labels"]} for b in batches()]
    res = compute_gem_masks(mlp(), relabeled, GemMaskConfig(density=0.05, target_modules=TARGETS), reads_targets)
    assert sum(res.counts.values()) > 0


def test_plain_wrapper_has_its_own_name():
    import leantrain.finetune.gem as gem

    res = compute_gem_masks(mlp(), batches(), GemMaskConfig(density=0.05, target_modules=TARGETS))
    model = apply_gem_masks(mlp(), res)
    assert all(type(model.get_submodule(n)) is GemSparseDeltaLinear for n in TARGETS if res.counts[n])
    assert not hasattr(gem, "GemLinear")


def test_tiny_density_budget_is_an_error():
    with pytest.raises(LeantrainError, match="raise the density"):
        compute_gem_masks(mlp(), batches(), GemMaskConfig(density=1e-4, target_modules=TARGETS))


# ----------------------------------------------------------------------------------------------------------------
# GemSparseDeltaLinear


def test_gem_linear_forward_merge_and_state_size():
    torch.manual_seed(0)
    base = nn.Linear(10, 7)
    idx = torch.tensor([3, 11, 40, 69], dtype=torch.int32)
    layer = GemSparseDeltaLinear(copy.deepcopy(base), idx)
    assert [p.numel() for p in layer.parameters() if p.requires_grad] == [4]
    with torch.no_grad():
        layer.gem_values.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    x = torch.randn(5, 10)
    w = base.weight.detach().clone().flatten()
    w[idx.long()] += layer.gem_values.detach()
    expected = F.linear(x, w.view(7, 10), base.bias)
    torch.testing.assert_close(layer(x), expected)
    assert torch.equal(layer.base.weight, base.weight)  # forward leaves W alone
    assert torch.count_nonzero(layer.get_delta_weight()) == 4
    layer.merge()
    torch.testing.assert_close(layer(x), expected)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, base.weight)


def test_gem_linear_copy_init_doubles_selected_weights():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    idx = torch.tensor([0, 5, 23], dtype=torch.int32)
    assert torch.count_nonzero(GemSparseDeltaLinear(copy.deepcopy(base), idx).gem_values) == 0
    layer = GemSparseDeltaLinear(copy.deepcopy(base), idx, init="copy")
    w = base.weight.detach().clone().flatten()
    w[idx.long()] *= 2
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), F.linear(x, w.view(4, 6), base.bias))


def test_training_changes_only_masked_entries_and_optimizer_state_scales_with_budget():
    model, data = mlp(), batches()
    base = copy.deepcopy(model)
    res = compute_gem_masks(model, data, GemMaskConfig(density=0.05, target_modules=TARGETS))
    apply_gem_masks(model, res)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(res.counts.values())
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for b in data:
            F.cross_entropy(model(b["x"]), b["labels"]).backward()
            opt.step()
            opt.zero_grad()
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == sum(res.counts.values())
    for name in TARGETS:
        layer = model.get_submodule(name)
        layer.merge()
        diff = (layer.base.weight - base.get_submodule(name).weight).flatten() != 0
        changed = set(torch.nonzero(diff).flatten().tolist())
        assert changed and changed <= set(res.indices[name].tolist())
        assert torch.equal(layer.base.bias, base.get_submodule(name).bias)
    assert torch.equal(model[6].weight, base[6].weight)
