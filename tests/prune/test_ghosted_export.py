"""A saved ghosted model folder loads anywhere: plain transformers with trust_remote_code (no leantrain on the path),
the Auto API after ``import leantrain``, never silently as a plain Llama; operators follow the model's dtype."""

import json
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_depth import batches, tiny_llama  # noqa: E402

from leantrain.prune.ghosted import fit_ghosted_layers  # noqa: E402

PROMPT = [[1, 5, 9, 13, 2, 7, 30, 41, 3]]


def _tokenizer(folder: Path) -> None:
    """A 64-token word-level tokenizer ("t0" .. "t63"), enough for pipeline("text-generation")."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", pad_token="t0")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ghosted")
    ghosted, _ = fit_ghosted_layers(tiny_llama(), [2, 3, 5], batches(8))
    ghosted.save_pretrained(folder)
    _tokenizer(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess computes with 1 thread too: bit-identical reductions
    try:
        with torch.no_grad():
            np.save(folder.parent / "logits.npy", ghosted(torch.tensor(PROMPT)).logits.numpy())
    finally:
        torch.set_num_threads(threads)
    return folder, ghosted


def _run_without_leantrain(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that sees the installed packages but not leantrain (no .pth, no src/)."""
    site = sysconfig.get_paths()["purelib"]
    env = {"PYTHONPATH": site, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    prelude = "import importlib.util\nassert importlib.util.find_spec('leantrain') is None, 'leantrain importable'\n"
    return subprocess.run([sys.executable, "-S", "-c", prelude + textwrap.dedent(code)], env=env, cwd="/",
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_the_folder_holds_its_code_and_an_auto_map(saved):
    folder, _ = saved
    names = {p.name for p in folder.iterdir()}
    assert {"configuration_ghosted.py", "modeling_ghosted.py", "model.ghosted.safetensors"} <= names
    assert "model.safetensors" not in names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "leantrain_ghosted_llama"
    assert config["auto_map"] == {"AutoConfig": "configuration_ghosted.GhostedLlamaConfig",
                                  "AutoModelForCausalLM": "modeling_ghosted.GhostedLlamaForCausalLM"}  # fmt: skip
    for name in ("configuration_ghosted.py", "modeling_ghosted.py"):
        assert "leantrain" not in "".join(
            line for line in (folder / name).read_text().splitlines() if line.startswith(("import", "from"))
        )


def test_it_loads_with_plain_transformers_and_remote_code(saved):
    folder, _ = saved
    out = _run_without_leantrain(f"""
        import numpy as np, torch
        from transformers import AutoModelForCausalLM, pipeline
        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "GhostedLlamaForCausalLM", type(model)
        with torch.no_grad():
            logits = model(torch.tensor({PROMPT})).logits.numpy()
        assert np.array_equal(logits, np.load({str(folder.parent / "logits.npy")!r})), "logits differ"
        generate = pipeline("text-generation", model={str(folder)!r}, trust_remote_code=True)
        text = generate("t5 t9 t13", max_new_tokens=4, do_sample=False)[0]["generated_text"]
        assert text.startswith("t5 t9 t13"), text
        print("OK", text)
    """)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_without_remote_code_or_as_a_plain_llama_it_refuses_to_load(saved):
    folder, _ = saved
    out = _run_without_leantrain(f"""
        from transformers import AutoModelForCausalLM, LlamaForCausalLM
        try:
            LlamaForCausalLM.from_pretrained({str(folder)!r})
        except OSError as err:
            print("plain llama refused:", str(err).splitlines()[0])
        else:
            raise SystemExit("a plain LlamaForCausalLM loaded the ghosted folder without its operators")
        try:
            AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=False)
        except ValueError as err:
            print("auto refused:", str(err).splitlines()[0])
        else:
            raise SystemExit("AutoModelForCausalLM loaded it without remote code")
    """)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout
    assert "plain llama refused" in out.stdout and "auto refused" in out.stdout


def test_after_import_leantrain_autoconfig_and_automodel_work_without_remote_code(saved):
    folder, _ = saved
    code = f"""
        import leantrain
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained({str(folder)!r})
        assert type(config).__name__ == "GhostedLlamaConfig" and config.ghost_placement == {{"2": "pre", "3": "pre"}}
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r})
        assert type(model).__module__ == "leantrain.prune.modeling_ghosted", type(model).__module__
        print("OK")
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_a_folder_saved_before_the_weights_variant_still_loads(saved, tmp_path):
    folder, ghosted = saved
    old = tmp_path / "old"
    ghosted.save_pretrained(old)
    (old / "model.ghosted.safetensors").rename(old / "model.safetensors")
    again = transformers.AutoModelForCausalLM.from_pretrained(old).eval()
    x = torch.tensor(PROMPT)
    torch.testing.assert_close(again(x).logits, ghosted(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_operators_follow_the_model_dtype(saved, dtype):
    _, ghosted = saved
    model = transformers.AutoModelForCausalLM.from_pretrained(saved[0]).to(dtype).eval()
    assert model.model.layers[2].ghost_pre.linear.weight.dtype == dtype
    out = model.generate(torch.tensor(PROMPT), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, len(PROMPT[0]) + 3)
    logits = model(torch.tensor(PROMPT)).logits.float()
    reference = ghosted(torch.tensor(PROMPT)).logits
    assert (logits - reference).abs().max() < 0.1 * reference.abs().max()  # half precision, not garbage


def test_recover_none_exports_an_ordinary_llama(tmp_path):
    pruned, _ = fit_ghosted_layers(tiny_llama(), [2, 3], batches(8), method="none")
    pruned.save_pretrained(tmp_path)
    out = _run_without_leantrain(f"""
        from transformers import LlamaForCausalLM
        model = LlamaForCausalLM.from_pretrained({str(tmp_path)!r})
        assert model.config.num_hidden_layers == 6 and model.config.model_type == "llama"
        print("OK")
    """)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_the_import_hooks_cover_every_ghosted_family():
    from leantrain.import_hooks import EXTENSIONS
    from leantrain.prune.configuration_ghosted import FAMILIES

    hooked = {name.split(".")[2] for name in EXTENSIONS if name.startswith("transformers.models.")} - {"auto"}
    assert hooked == set(FAMILIES)


@pytest.mark.parametrize("first", ["from transformers import LlamaConfig", "from transformers import AutoConfig",
                                   "import transformers.models.llama.modeling_llama"])  # fmt: skip
def test_import_leantrain_registers_whatever_transformers_module_loads_first(first):
    code = f"""
        import leantrain
        {first}
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
        assert "leantrain_ghosted_llama" in CONFIG_MAPPING
        assert any(c.__name__ == "GhostedLlamaConfig" for c in MODEL_FOR_CAUSAL_LM_MAPPING._extra_content)
        print("OK")
    """
    out = subprocess.run([sys.executable, "-W", "error", "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
