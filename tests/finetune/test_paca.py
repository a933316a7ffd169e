"""PaCA core (plain PyTorch): exact gradients, merge, LoRA equivalence, saved-activation bytes, QPaCA int8."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leantrain.errors import ConfigError
from leantrain.finetune.paca import Int8WeightOnly, PacaLinear, paca_linear, select_paca_indices


def _layer(d_in=16, d_out=12, r=5, dtype=torch.float64, bias=True, seed=0) -> PacaLinear:
    torch.manual_seed(seed)
    layer = PacaLinear(nn.Linear(d_in, d_out, bias=bias).to(dtype), r=r, paca_alpha=10.0, seed=3, name="fc")
    with torch.no_grad():
        layer.paca_delta.normal_()  # a non-trivial adapter
    return layer


def _dense_reference(layer: PacaLinear, x: torch.Tensor, grad_y: torch.Tensor):
    """Output and grads of a dense trainable W~ = W + delta-columns (the ground truth)."""
    w = (layer.base.weight.detach() + layer.get_delta_weight()).requires_grad_()
    b = None if layer.base.bias is None else layer.base.bias.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    y = F.linear(x, w, b)
    y.backward(grad_y)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16), (2, 2, 3, 16)])
def test_gradients_equal_dense_reference_restricted_to_columns(shape):
    layer = _layer()
    layer.base.bias.requires_grad_(True)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    y_ref, gx_ref, gw_ref, gb_ref = _dense_reference(layer, x, grad_y)
    idx = layer.paca_indices
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, gx_ref, rtol=1e-12, atol=1e-12)
    # delta enters as scaling * delta, so its gradient is scaling times the dense column gradient
    torch.testing.assert_close(layer.paca_delta.grad, layer.scaling * gw_ref[:, idx], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.base.bias.grad, gb_ref, rtol=1e-12, atol=1e-12)
    assert layer.base.weight.grad is None


def test_gradcheck_and_two_overlapping_adapters():
    torch.manual_seed(0)
    w, b = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    i1, i2 = torch.tensor([0, 3, 4]), torch.tensor([3, 8])
    d1 = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    d2 = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    fn = lambda x, d1, d2: paca_linear(x, w, b, [(i1, 0.5, d1), (i2, 2.0, d2)])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, d1, d2))
    dense = w.clone()
    dense[:, i1] += 0.5 * d1.detach()
    dense[:, i2] += 2.0 * d2.detach()
    torch.testing.assert_close(fn(x, d1, d2), F.linear(x, dense, b))


def test_base_weight_never_modified_and_only_delta_trains():
    layer = _layer(dtype=torch.float32)
    w0, b0 = layer.base.weight.detach().clone(), layer.base.bias.detach().clone()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["paca_delta"]
    delta0 = layer.paca_delta.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(layer.base.weight, w0) and torch.equal(layer.base.bias, b0)
    assert not torch.equal(layer.paca_delta, delta0)


def test_merge_equals_unmerged_and_unmerge_is_exact():
    layer = _layer(dtype=torch.float32)
    x = torch.randn(3, 4, 16)
    w0 = layer.base.weight.detach().clone()
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)
    outside = torch.ones(16, dtype=torch.bool)
    outside[layer.paca_indices] = False
    assert torch.equal(layer.base.weight[:, outside], w0[:, outside])  # no weight outside S changes
    assert not torch.equal(layer.base.weight[:, ~outside], w0[:, ~outside])
    torch.testing.assert_close(layer.to_linear()(x), y, rtol=1e-6, atol=1e-6)
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_get_delta_weight_is_zero_outside_columns():
    layer = _layer()
    delta = layer.get_delta_weight()
    mask = torch.zeros(16, dtype=torch.bool)
    mask[layer.paca_indices] = True
    assert torch.count_nonzero(delta[:, ~mask]) == 0
    torch.testing.assert_close(delta[:, mask], layer.scaling * layer.paca_delta.detach())


def test_equals_its_lora_conversion_in_peft():
    peft = pytest.importorskip("peft")
    layer = _layer(d_in=16, d_out=12, r=5, dtype=torch.float32)
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(16, 12))
    host[0].load_state_dict(layer.base.state_dict())
    lora = peft.get_peft_model(host, peft.LoraConfig(r=5, lora_alpha=5, target_modules=["0"]))
    a, b, scaling = layer.to_lora()
    assert scaling == 1.0 and lora.base_model.model[0].scaling["default"] == 1.0
    with torch.no_grad():
        lora.base_model.model[0].lora_A["default"].weight.copy_(a)
        lora.base_model.model[0].lora_B["default"].weight.copy_(b)
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(lora(x), layer(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(a.sum(0)[layer.paca_indices], torch.ones(5))  # A selects exactly the columns S


def _saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves during forward, excluding tensors that are the module's own parameters/buffers."""
    own = {t.data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in own:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return total


def test_saved_activation_bytes_are_r_over_d_in_of_lora():
    peft = pytest.importorskip("peft")
    d_in, d_out, r, tokens = 384, 384, 8, 4 * 32
    paca = _layer(d_in=d_in, d_out=d_out, r=r, dtype=torch.float32)
    lora = peft.get_peft_model(nn.Sequential(nn.Linear(d_in, d_out)), peft.LoraConfig(r=r, target_modules=["0"]))
    x = torch.randn(4, 32, d_in, requires_grad=True)
    paca_bytes = _saved_activation_bytes(paca, x)
    lora_bytes = _saved_activation_bytes(lora, x)
    input_bytes = tokens * d_in * 4
    assert lora_bytes >= input_bytes  # LoRA keeps the full input for A's gradient
    assert paca_bytes == tokens * r * 4  # PaCA keeps x[..., S] only
    assert paca_bytes <= r / d_in * input_bytes + 64


def test_indices_seeded_per_layer_sorted_int64():
    a = select_paca_indices(64, 8, seed=7, name="layer.0.query")
    assert a.dtype == torch.int64 and torch.equal(a, torch.sort(a).values) and a.unique().numel() == 8
    assert torch.equal(a, select_paca_indices(64, 8, seed=7, name="layer.0.query"))
    assert not torch.equal(a, select_paca_indices(64, 8, seed=7, name="layer.1.query"))
    torch.manual_seed(5)
    g1 = select_paca_indices(64, 8)
    torch.manual_seed(5)
    assert torch.equal(g1, select_paca_indices(64, 8))  # unseeded: global RNG


def test_validation_messages():
    with pytest.raises(ConfigError, match="r=0"):
        PacaLinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ConfigError, match="in_features=4"):
        PacaLinear(nn.Linear(4, 4), r=5)
    with pytest.raises(ConfigError, match="paca_alpha"):
        PacaLinear(nn.Linear(4, 4), r=2, paca_alpha=0)
    with pytest.raises(ConfigError, match="'enc.conv'.*Conv1d"):
        PacaLinear(nn.Conv1d(4, 4, 1), r=2, name="enc.conv")
    with pytest.raises(ConfigError, match="distinct"):
        PacaLinear(nn.Linear(4, 4), r=2, indices=torch.tensor([1, 1]))


def test_qpaca_int8_matches_dequantized_dense_and_saves_memory():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    w_fp32 = base.weight.detach().clone()
    layer = PacaLinear(base, r=8, paca_alpha=16, seed=0, name="q", quantize="int8")
    assert base.weight is None and layer.quantized.qweight.dtype == torch.int8
    with torch.no_grad():
        layer.paca_delta.normal_()
    w_deq = layer.quantized.dequantize()
    # the r trained columns start from the exact fp32 pretrained values
    assert torch.equal(w_deq[:, layer.paca_indices], w_fp32[:, layer.paca_indices])
    assert (w_deq - w_fp32).abs().max() <= w_fp32.abs().amax(1).max() / 127
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    w_ref = (w_deq + layer.get_delta_weight()).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, w_ref, base.bias).backward(grad_y)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.paca_delta.grad, layer.scaling * w_ref.grad[:, layer.paca_indices])
    torch.testing.assert_close(layer.to_linear()(x), y)
    # int8 weight + fp32 row scales + int64 indices + the r kept fp32 columns
    assert layer.quantized.nbytes() == 48 * 64 + 48 * 4 + 8 * 8 + 48 * 8 * 4
    assert layer.quantized.nbytes() < 0.4 * w_fp32.numel() * 4
    with pytest.raises(ConfigError, match="to_linear"):
        layer.merge()


def test_int8_weight_roundtrip_error_bounded():
    w = torch.randn(32, 20)
    q = Int8WeightOnly(w)
    err = (q.dequantize() - w).abs().amax(1)
    assert torch.all(err <= w.abs().amax(1) / 254 + 1e-6)  # half a quantization step per row
