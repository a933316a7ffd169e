"""LSTM classifier: padding (extra columns, left vs right, the pad ids themselves) never changes the logits."""

from __future__ import annotations

import pytest
import torch

from leantrain.models import build_model

PAD = 0


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("lstm", vocab_size=30, num_classes=3, embed_dim=8, hidden_size=8, num_layers=2).eval()


def _right_padded(lengths, width):
    g = torch.Generator().manual_seed(1)
    ids = torch.full((len(lengths), width), PAD)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 30, (n,), generator=g)
    return ids


def test_extra_padding_columns_do_not_change_logits(model):
    ids = _right_padded([5, 2, 7], width=7)
    wider = torch.cat([ids, torch.full((3, 9), PAD)], dim=1)
    torch.testing.assert_close(model(wider), model(ids), rtol=0, atol=1e-6)
    torch.testing.assert_close(model(wider, attention_mask=wider != PAD), model(ids), rtol=0, atol=1e-6)


def test_left_and_right_padding_agree(model):
    lengths = [5, 2, 7]
    right = _right_padded(lengths, width=7)
    left = torch.stack([torch.roll(row, 7 - n) for row, n in zip(right, lengths, strict=True)])
    assert not torch.equal(left, right)
    torch.testing.assert_close(model(left), model(right), rtol=0, atol=1e-6)


def test_masked_positions_are_ignored_whatever_their_ids(model):
    ids = _right_padded([4, 6], width=6)
    mask = ids != PAD
    noisy = ids.masked_fill(~mask, 17)  # padding filled with a real token id, hidden by the mask
    torch.testing.assert_close(model(noisy, attention_mask=mask), model(ids), rtol=0, atol=1e-6)
    assert not torch.allclose(model(noisy), model(ids))  # without the mask, 17 is a real token


def test_tokenizer_batch_unpacks_into_forward(model):
    ids = _right_padded([3, 6], width=6)
    batch = {"input_ids": ids, "attention_mask": (ids != PAD).long(), "token_type_ids": torch.zeros_like(ids)}
    assert model(**batch).shape == (2, 3)
