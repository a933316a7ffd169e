"""tokenize_texts (real MiniLM tokenizer) and lm_blocks."""

import numpy as np
import pytest

from leantrain.data import ArrayBatches, lm_blocks, tokenize_texts
from leantrain.errors import ConfigError

TEXTS = ["Self-driving cars are great!", "no", "", "word " * 300]


def test_tokenize_texts_pads_right_and_counts_real_tokens(minilm_tokenizer):
    out = tokenize_texts(minilm_tokenizer, np.array(TEXTS), max_length=32)
    assert out.input_ids.shape == (4, 32) and out.input_ids.dtype == np.int64 and out.lengths.dtype == np.int64
    assert out.pad_id == minilm_tokenizer.pad_token_id == 0
    for row, text in zip(out.input_ids, TEXTS, strict=True):
        expected = minilm_tokenizer(text, truncation=True, max_length=32)["input_ids"]
        assert row[: len(expected)].tolist() == expected and (row[len(expected) :] == out.pad_id).all()
    assert out.lengths.tolist() == [len(minilm_tokenizer(t)["input_ids"][:32]) for t in TEXTS]
    assert out.lengths[3] == 32 and out.input_ids[3, -1] == minilm_tokenizer.sep_token_id  # truncation keeps [SEP]
    assert (out.input_ids[:, 0] == minilm_tokenizer.cls_token_id).all()


def test_tokenized_texts_feed_padding_aware_batches(minilm_tokenizer):
    out = tokenize_texts(minilm_tokenizer, TEXTS[:3], max_length=64)
    batch = next(iter(ArrayBatches({"input_ids": out.input_ids}, 3, trim_key="input_ids", lengths=out.lengths)))
    assert batch["input_ids"].shape == (3, out.lengths.max()) and batch["attention_mask"].sum() == out.lengths.sum()


class _NoPadTokenizer:
    """A decoder-style tokenizer without a pad token (pad falls back to EOS)."""

    pad_token_id = None
    eos_token_id = 9

    def __call__(self, texts, truncation, max_length, add_special_tokens):
        return {"input_ids": [[ord(c) for c in t][:max_length] for t in texts]}


def test_pad_falls_back_to_eos_and_empty_text_gets_length_one():
    out = tokenize_texts(_NoPadTokenizer(), ["abc", ""], max_length=5)
    assert out.pad_id == 9 and out.lengths.tolist() == [3, 1]
    assert out.input_ids.tolist() == [[97, 98, 99, 9, 9], [9, 9, 9, 9, 9]]
    with pytest.raises(ConfigError, match="max_length=0"):
        tokenize_texts(_NoPadTokenizer(), ["a"], max_length=0)


def test_lm_blocks_shapes_and_next_token_shift():
    tokens = np.arange(103, dtype=np.int32)
    x, y = lm_blocks(tokens, block_size=10)
    assert x.shape == y.shape == (10, 10) and x.dtype == y.dtype == np.int64
    assert np.array_equal(y[:, :-1], x[:, 1:]) and np.array_equal(y[:-1, -1], x[1:, 0])
    assert np.array_equal(y.ravel(), tokens[1:101])


def test_lm_blocks_are_views_of_int64_tokens():
    tokens = np.arange(21, dtype=np.int64)
    x, y = lm_blocks(tokens, 4)
    assert np.shares_memory(x, tokens) and np.shares_memory(y, tokens) and x.shape == (5, 4)


@pytest.mark.parametrize(
    ("tokens", "block", "message"),
    [(np.arange(10), 10, "at least 11"), (np.arange(10), 0, "block_size=0"), (np.zeros((2, 5)), 2, "1-D")],
)
def test_lm_blocks_errors(tokens, block, message):
    with pytest.raises(ConfigError, match=message):
        lm_blocks(tokens, block)
