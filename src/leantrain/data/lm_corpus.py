"""Language-model corpora as streams of token ids: the complete Shakespeare, English Wikipedia prose and the Lee
news articles (:data:`TEXTS`), and a user's own text file (:func:`read_text_file`).

Character level (``tokenizer=None``): the vocabulary is the sorted set of distinct characters of the
whole text (84 for this corpus) and ids index into it. With a Hugging Face tokenizer, ids come from
``tokenizer(chunks, add_special_tokens=False)["input_ids"]`` over ~400-character chunks cut at line
ends, concatenated. Departure from tokenising the text in one call: chunking keeps it fast (batched
in the Rust tokenizer) and below ``model_max_length``; special tokens are left out so that no
[CLS]/[SEP]/BOS markers appear in the middle of the stream.

Token ids are cached per tokenizer under a key made of the tokenizer's folder name, its length and a
hash of its vocabulary. The train/val/test split is contiguous (train first, then val, then test)
and does not depend on the seed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

import leantrain.data.sources as sources
from leantrain.data.array_store import cached_arrays
from leantrain.data.dataset import Dataset, Split
from leantrain.data.splits import SplitConfig, contiguous_bounds
from leantrain.errors import ConfigError

CHUNK_CHARS = 400


def encode_chars(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Char-level encoding: (ids in the smallest unsigned dtype, vocab as a unicode array of single chars)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table, ids = np.unique(codes, return_inverse=True)
    vocab = np.array([chr(c) for c in table], dtype="<U1")
    return ids.astype(np.min_scalar_type(max(len(table) - 1, 0))), vocab


def text_chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters, each ending at a line end (newlines kept)."""
    chunks, current, length = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        length += len(line)
        if length >= size:
            chunks.append("".join(current))
            current, length = [], 0
    if current:
        chunks.append("".join(current))
    return chunks


def tokenizer_key(tokenizer: Any) -> str:
    """Stable cache key for a Hugging Face tokenizer: folder name, length and a short vocabulary hash."""
    name = Path(str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)).name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "tokenizer"
    digest = hashlib.sha1(type(tokenizer).__name__.encode())
    for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    return f"{name}-{len(tokenizer)}-{digest.hexdigest()[:10]}"


def tokenize_corpus(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of ``text`` (no special tokens), in the smallest unsigned dtype that holds them."""
    pieces = tokenizer(text_chunks(text), add_special_tokens=False)["input_ids"]
    ids = np.fromiter((i for piece in pieces for i in piece), dtype=np.int64)
    top = int(ids.max()) if len(ids) else 0
    return ids.astype(np.min_scalar_type(top))


# corpus name -> the reader of its whole text in leantrain.data.sources (run once per tokenizer: the token ids are
# cached)
TEXTS: dict[str, str] = {"shakespeare": "read_shakespeare", "wikipedia": "read_wikipedia", "lee-news": "read_lee_news"}


def corpus_ids(name: str, tokenizer: Any) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """The cached int64 token ids of corpus ``name`` (:data:`TEXTS`) and, for char level, the vocab table."""
    read = getattr(sources, TEXTS[name])
    if tokenizer is None:

        def build() -> dict[str, np.ndarray]:
            ids, vocab = encode_chars(read())
            return {"ids-char": ids, "vocab-char": vocab}

        arrays = cached_arrays(name, ("ids-char", "vocab-char"), build)
        return arrays["ids-char"].astype(np.int64), tuple(arrays["vocab-char"].tolist())
    key = f"ids-{tokenizer_key(tokenizer)}"
    arrays = cached_arrays(name, (key,), lambda: {key: tokenize_corpus(tokenizer, read())})
    return arrays[key].astype(np.int64), None


def load_text_corpus(name: str, config: SplitConfig, tokenizer: Any = None) -> Dataset:
    """Corpus ``name`` as a ``kind="lm"`` Dataset with contiguous train/val/test token streams."""
    ids, vocab = corpus_ids(name, tokenizer)
    train, val, test = contiguous_bounds(len(ids), config)
    return Dataset(
        name=name,
        kind="lm",
        train=Split(ids[train]),
        val=Split(ids[val]),
        test=Split(ids[test]),
        vocab=vocab,
    )


def read_text_file(path: str | Path, field: str = "text") -> str:
    """A user's text: a plain UTF-8 file as it is, or JSON Lines (``.jsonl`` / ``.ndjson``, one object per line)
    whose ``field`` strings are joined by blank lines. Errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"text file {path} does not exist (or is not a file)")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text ({err}); convert it first") from err
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        if not raw.strip():
            raise ConfigError(f"text file {path} is empty")
        return raw
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{path} line {number} is not JSON ({err.msg}); JSON Lines need one object per line"
            ) from err
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise ConfigError(f"{path} line {number} has no string field {field!r}; pass the field that holds text")
        texts.append(value)
    if not texts:
        raise ConfigError(f"{path} holds no records")
    return "\n\n".join(texts)
