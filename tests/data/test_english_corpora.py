"""General-English corpora for LLM calibration and evaluation (Wikipedia prose, Lee news) and users' text files."""

import importlib.util
import json

import numpy as np
import pytest

from leantrain.data import load_dataset, sources
from leantrain.data.lm_corpus import read_text_file
from leantrain.errors import ConfigError

needs_gensim = pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim (data) not installed")


@pytest.fixture(scope="module")
def wikipedia():
    if importlib.util.find_spec("mwparserfromhell") is None:
        pytest.skip("mwparserfromhell not installed")
    return sources.read_wikipedia()


@needs_gensim
def test_wikipedia_is_plain_prose_without_markup(wikipedia):
    assert len(wikipedia) > 2_000_000  # characters: about 600k SmolLM2 tokens
    assert wikipedia.startswith("Anarchism\nAnarchism is a political philosophy")
    for markup in ("[[", "]]", "{{", "}}", "<ref", "&lt;", "||"):
        assert markup not in wikipedia, markup
    lines = [line for line in wikipedia.splitlines() if line and " " in line]
    assert np.median([len(line.split()) for line in lines]) > 40  # paragraphs, not list or table debris


@needs_gensim
def test_the_two_sources_are_different_text():
    news = sources.read_lee_news()
    assert news.count("\n\n") == 299  # 300 articles
    assert "bushfire" in news[:400]


@needs_gensim
def test_corpora_split_contiguously_with_a_tokenizer(wikipedia, minilm_tokenizer):
    ds = load_dataset("wikipedia", tokenizer=minilm_tokenizer)
    assert ds.kind == "lm" and len(ds.train) > 7 * len(ds.test) > 0
    assert minilm_tokenizer.decode(ds.train.x[:30].tolist()).startswith(
        "anarchism anarchism is a political philosophy"
    )


def test_a_plain_text_file_is_read_as_it_is(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First line.\n\nSecond paragraph.\n", encoding="utf-8")
    assert read_text_file(path) == "First line.\n\nSecond paragraph.\n"


def test_json_lines_join_the_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "body": f"doc {i}"}) for i in range(3)) + "\n\n")
    assert read_text_file(path, field="body") == "doc 0\n\ndoc 1\n\ndoc 2"
    with pytest.raises(ConfigError, match="line 1 has no string field 'text'"):
        read_text_file(path)


@pytest.mark.parametrize("content, suffix, message", [
    ("", ".txt", "is empty"),
    ('{"text": "a"}\nnot json\n', ".jsonl", "line 2 is not JSON"),
    ("\n\n", ".jsonl", "holds no records"),
])  # fmt: skip
def test_bad_text_files_name_the_problem(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_text_file(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")
