"""Head warm-up before GEM's scoring pass: only the head trains, the scores come from the warmed head, and apply_gem
hands the warmed head to PEFT's modules_to_save."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gem_tiny import tiny_bert  # noqa: E402

from leantrain.errors import LeantrainError  # noqa: E402
from leantrain.finetune.gem import GemMaskConfig, compute_gem_masks, default_gem_loss  # noqa: E402
from leantrain.finetune.gem_head_warmup import find_head_modules, warm_up_head  # noqa: E402

TARGETS = ["query", "value"]


def text_batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1, 100, (4, 12), generator=g),
            "attention_mask": torch.ones(4, 12, dtype=torch.long),
            "labels": torch.randint(0, 3, (4,), generator=g),
        }
        for _ in range(n)
    ]


def config(**kwargs) -> GemMaskConfig:
    return GemMaskConfig(density=5e-3, target_modules=TARGETS, **kwargs)


def test_warm_up_changes_only_the_head_and_restores_flags_grads_and_mode():
    model, data = tiny_bert(), text_batches()
    model.bert.embeddings.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    res = compute_gem_masks(model, data, config(head_warmup_steps=6, head_warmup_lr=1e-2), head_modules=["classifier"])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}
    assert len(res.head_warmup_losses) == 6 and res.head_warmup_losses[-1] < res.head_warmup_losses[0]
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(not p.requires_grad for p in model.bert.embeddings.parameters())
    assert (
        model.classifier.weight.requires_grad and model.bert.encoder.layer[0].attention.self.query.weight.requires_grad
    )


def test_scores_come_from_the_warmed_up_head():
    data = text_batches()
    warmed = compute_gem_masks(tiny_bert(), iter(data), config(head_warmup_steps=5), head_modules=["classifier"])
    by_hand = tiny_bert()  # the same warm-up by hand, then a scoring pass without one
    heads = find_head_modules(by_hand, ["classifier"])
    warm_up_head(by_hand, data, heads, steps=5, lr=config().head_warmup_lr, loss_fn=default_gem_loss)
    expected = compute_gem_masks(by_hand, data, config(head_warmup_steps=0), head_modules=["classifier"])
    cold = compute_gem_masks(tiny_bert(), data, config(head_warmup_steps=0), head_modules=["classifier"])
    for name, g in expected.gradients.items():
        assert torch.equal(warmed.gradients[name], g), name
        assert torch.equal(warmed.indices[name], expected.indices[name]), name
    assert any(not torch.equal(cold.gradients[n], g) for n, g in expected.gradients.items())


def test_no_warm_up_without_head_modules_or_steps():
    data = text_batches()
    for kwargs in ({"head_modules": None}, {"head_modules": ["classifier"]}):
        steps = 20 if kwargs["head_modules"] is None else 0
        model = tiny_bert()
        res = compute_gem_masks(model, data, config(head_warmup_steps=steps), **kwargs)
        assert res.head_warmup_losses == []
        assert torch.equal(model.classifier.weight, tiny_bert().classifier.weight)
    with pytest.raises(
        LeantrainError, match=r"modules_to_save=\['head'\] matched no module.*bert, dropout, classifier"
    ):
        compute_gem_masks(tiny_bert(), data, config(), head_modules=["head"])


def test_apply_gem_trains_the_warmed_head_as_module_to_save():
    pytest.importorskip("peft")
    from leantrain.finetune.peft_tuners.gem import GemConfig, apply_gem

    data = text_batches()
    snapshot = tiny_bert()
    reference = tiny_bert()
    compute_gem_masks(reference, data, config(), head_modules=["classifier"])  # default 20 steps
    cfg = GemConfig(density=5e-3, target_modules=TARGETS, modules_to_save=["classifier"])
    assert cfg.head_warmup_steps == 20
    peft_model = apply_gem(tiny_bert(), data, cfg)
    assert len(peft_model.gem_masks.head_warmup_losses) == 20
    head = peft_model.base_model.model.classifier
    assert torch.equal(head.modules_to_save["default"].weight, reference.classifier.weight)
    assert head.modules_to_save["default"].weight.requires_grad
    assert not torch.equal(head.modules_to_save["default"].weight, snapshot.classifier.weight)
    merged = dict(peft_model.merge_and_unload().named_parameters())
    for name, p in snapshot.named_parameters():
        if not name.startswith("classifier"):
            assert torch.equal(merged[name], p), name  # nothing trained yet: every non-head weight as built
