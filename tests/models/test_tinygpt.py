"""tinygpt: causality, the block_size limit, generation length and reproducibility, GPT-2 init and tying."""

from __future__ import annotations

import math

import pytest
import torch

from leantrain.errors import ConfigError
from leantrain.models import build_model

SMALL = {"vocab_size": 20, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("tinygpt", **SMALL).eval()


@pytest.mark.parametrize("t", [0, 5, 10])
def test_future_tokens_do_not_change_past_logits(model, t):
    idx = torch.randint(0, 20, (2, 12))
    changed = idx.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 20
    before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


def test_hugging_face_style_call_matches_positional(model):
    idx = torch.randint(0, 20, (2, 8))
    assert torch.equal(model(input_ids=idx, attention_mask=torch.ones_like(idx)), model(idx))


def test_sequence_longer_than_block_size_is_a_config_error(model):
    assert model(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, 20)
    with pytest.raises(ConfigError, match="17 exceeds GPTConfig.block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_generate_length_and_reproducibility(model):
    idx = torch.randint(0, 20, (3, 4))
    out = model.generate(idx, max_new_tokens=20, generator=torch.Generator().manual_seed(0))  # crosses block_size
    assert out.shape == (3, 24) and torch.equal(out[:, :4], idx)
    again = model.generate(idx, max_new_tokens=20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_top_1_sampling_equals_greedy(model):
    idx = torch.randint(0, 20, (2, 3))
    greedy = model.generate(idx, max_new_tokens=6, temperature=0.0)
    top1 = model.generate(idx, max_new_tokens=6, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(greedy, top1)


def test_tied_embeddings_and_gpt2_init():
    torch.manual_seed(0)
    model = build_model("tinygpt", n_layer=8, n_embd=256)
    assert model.lm_head.weight is model.wte.weight
    residual_std = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert abs(block.attn.c_proj.weight.std().item() - residual_std) < 0.1 * residual_std
        assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert sum(p.numel() for p in build_model("tinygpt").parameters()) == 818_048
