"""Turning text into fixed-width token-id arrays for classifiers and into next-token blocks for LMs.

``tokenize_texts`` right-pads to ``max_length`` and records each text's real length, so
``ArrayBatches(trim_key="input_ids", lengths=...)`` can cut every batch to its longest member
(padding-aware batching) and add the attention mask. ``lm_blocks`` cuts a token stream into
non-overlapping windows with next-token targets, as in nanoGPT-style character/BPE training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from leantrain.errors import ConfigError

TOKENIZE_BATCH = 4096


@dataclass(frozen=True, eq=False)
class TokenizedTexts:
    """Right-padded token ids ``(N, max_length)`` int64, real lengths ``(N,)`` int64 (>= 1), and the pad id."""

    input_ids: np.ndarray
    lengths: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return len(self.lengths)


def _pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id; decoder tokenizers often have none, so fall back to EOS, then 0.

    The choice does not matter for correctness: the attention mask hides padded positions.
    """
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> TokenizedTexts:
    """Tokenise ``texts`` with a Hugging Face tokenizer, special tokens included, truncated to ``max_length``.

    Padding is done here (always on the right), whatever the tokenizer's ``padding_side``. A text that
    yields no token at all gets length 1 (one pad position), so masks never have an all-zero row.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int | np.integer) or max_length < 1:
        raise ConfigError(f"max_length={max_length!r} is out of range; expected an integer >= 1")
    texts = texts.tolist() if isinstance(texts, np.ndarray) else [str(t) for t in texts]
    pad_id = _pad_id(tokenizer)
    input_ids = np.full((len(texts), max_length), pad_id, dtype=np.int64)
    lengths = np.ones(len(texts), dtype=np.int64)
    for start in range(0, len(texts), TOKENIZE_BATCH):
        batch = texts[start : start + TOKENIZE_BATCH]
        encoded = tokenizer(batch, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
        for row, ids in enumerate(encoded, start=start):
            input_ids[row, : len(ids)] = ids
            lengths[row] = max(len(ids), 1)
    return TokenizedTexts(input_ids=input_ids, lengths=lengths, pad_id=pad_id)


def lm_blocks(tokens: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping next-token windows: ``x`` (M, block_size) and ``y`` = ``x`` shifted left by one token.

    ``M = (len(tokens) - 1) // block_size``; the tail that does not fill a block is dropped. Both
    arrays are int64 views of ``tokens`` when it already is contiguous int64.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ConfigError(f"lm_blocks needs a 1-D token array; got shape {tokens.shape}")
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ConfigError(f"block_size={block_size!r} is out of range; expected an integer >= 1")
    blocks = (len(tokens) - 1) // block_size
    if blocks < 1:
        raise ConfigError(
            f"lm_blocks got {len(tokens)} tokens; block_size={block_size} needs at least {block_size + 1}"
        )
    tokens = tokens.astype(np.int64, copy=False)
    x = tokens[: blocks * block_size].reshape(blocks, block_size)  # (M, T)
    y = tokens[1 : blocks * block_size + 1].reshape(blocks, block_size)  # (M, T)
    return x, y
