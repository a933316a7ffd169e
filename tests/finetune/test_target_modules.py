"""Default target modules shared by GEM and PaCA, and the warning for a new head left frozen."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402

from leantrain.errors import ConfigError  # noqa: E402
from leantrain.finetune.peft_tuners.gem import GemConfig, apply_gem  # noqa: E402
from leantrain.finetune.peft_tuners.paca import PacaConfig  # noqa: E402
from leantrain.finetune.target_modules import default_target_modules, frozen_new_modules  # noqa: E402

FIX = "modules_to_save=['classifier'] (or task_type='SEQ_CLS')"


def tiny_bert_config(**kw) -> transformers.BertConfig:  # MiniLM's architecture, tiny
    return transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )  # fmt: skip


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(tiny_bert_config(num_labels=3))


def tiny_llama() -> nn.Module:  # SmolLM2's architecture (Llama, grouped-query attention), tiny
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def batches(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (4, 12), generator=g)
    if isinstance(model, transformers.LlamaForCausalLM):
        return [{"input_ids": ids, "labels": ids}]
    return [{"input_ids": ids, "labels": torch.randint(0, 3, (4,), generator=g)}]


def gem_targets(model: nn.Module) -> set[str]:
    cfg = GemConfig(density=0.5, budget_base="target_params", allocation="uniform")  # every target gets entries
    peft_model = apply_gem(model, batches(model), cfg)
    return set(peft_model.gem_masks.counts)


def paca_targets(model: nn.Module) -> set[str]:
    peft_model = get_peft_model(model, PacaConfig(r=2, random_seed=0))
    return set(peft_model.base_model.targeted_module_names)


@pytest.mark.parametrize(
    ("build", "leaves"), [(tiny_bert, {"query", "value"}), (tiny_llama, {"q_proj", "v_proj"})], ids=["bert", "llama"]
)
def test_gem_and_paca_default_to_the_same_modules(build, leaves):
    gem, paca = gem_targets(build()), paca_targets(build())
    assert gem == paca
    assert {name.rsplit(".", 1)[-1] for name in paca} == leaves
    assert len(paca) == 2 * 2  # two layers
    model_type = build().config.model_type
    assert set(default_target_modules(model_type)) == leaves  # PEFT's LoRA table
    lora = get_peft_model(build(), LoraConfig(r=2))
    assert set(lora.base_model.targeted_module_names) == paca  # and LoRA's own default


def test_paca_without_a_default_for_the_model_asks_for_target_modules():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="target_modules"):
        get_peft_model(model, PacaConfig(r=2))


# --------------------------------------------------------------------------------------------------------------------
# A freshly initialised head that stays frozen


@pytest.fixture(scope="module")
def encoder_checkpoint(tmp_path_factory):
    """A BERT encoder saved without a classification head, as MiniLM's sentence-transformers checkpoint is."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("encoder")
    transformers.BertModel(tiny_bert_config()).save_pretrained(path)
    return path


def load_classifier(path) -> nn.Module:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' report of the MISSING classifier is expected here
    try:
        return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    finally:
        hf_logging.set_verbosity(verbosity)


def wrap(method: str, model: nn.Module, **kw) -> nn.Module:
    if method == "paca":
        return get_peft_model(model, PacaConfig(r=2, random_seed=0, **kw))
    return apply_gem(model, batches(model), GemConfig(density=0.01, **kw))


def frozen_head_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "newly initialised" in str(w.message)]


@pytest.mark.parametrize("method", ["paca", "gem"])
def test_frozen_new_head_warns_with_the_fix(method, encoder_checkpoint):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = wrap(method, load_classifier(encoder_checkpoint))
    messages = frozen_head_warnings(record)
    assert len(messages) == 1 and messages[0].startswith("classifier:") and FIX in messages[0]
    assert not any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)


@pytest.mark.parametrize("method", ["paca", "gem"])
@pytest.mark.parametrize("fix", [{"modules_to_save": ["classifier"]}, {"task_type": "SEQ_CLS"}])
def test_trained_new_head_does_not_warn(method, fix, encoder_checkpoint):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = wrap(method, load_classifier(encoder_checkpoint), **fix)
    assert frozen_head_warnings(record) == []
    assert any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)


def test_model_not_loaded_from_a_checkpoint_is_not_checked():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        wrap("paca", tiny_bert())
    assert frozen_head_warnings(record) == []


def test_lora_model_is_checked_by_the_same_function(encoder_checkpoint):
    lora = get_peft_model(load_classifier(encoder_checkpoint), LoraConfig(r=2, target_modules=["query"]))
    assert frozen_new_modules(lora) == ["classifier"]
    saved = get_peft_model(
        load_classifier(encoder_checkpoint), LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    )
    assert frozen_new_modules(saved) == []
