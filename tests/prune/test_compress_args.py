"""`leantrain compress` checks its arguments before torch loads: one line, exit code 2, well under a second."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_probe import probe
from leantrain.errors import ConfigError
from leantrain.prune.compress_args import CAUSAL_LMS, PROTECTED, RECOVERIES, SELECTORS, check_compress_args

LEANTRAIN = Path(sys.executable).with_name("leantrain")  # the console script of this environment

# (arguments, the message); {tmp} is a folder holding full/keep.txt and a file named "file"
BAD = [
    (["--model", "minilm"], "--model 'minilm' is not a pretrained decoder LM here; use one of smollm2-135m"),
    (["--select", "random"], "--select 'random' is invalid; use one of lorp, shortgpt, streamline, last_n, auto"),
    (["--recover", "finetune"], "--recover 'finetune' is invalid; use one of none, diag, symmetric, ghosted"),
    (
        ["--calib-dataset", "digits"],
        "--calib-dataset 'digits' is not a language-modelling dataset; use one of "
        "shakespeare, wikipedia, lee-news, or --calib-file PATH",
    ),
    (["--calib-dataset", "wiki"], "--calib-dataset 'wiki' is not a language-modelling dataset"),
    (["--eval-dataset", "tweets"], "--eval-dataset 'tweets' is not a language-modelling dataset"),
    (["--calib-file", "{tmp}/missing.txt"], "--calib-file {tmp}/missing.txt does not exist (or is not a file)"),
    (["--eval-file", "{tmp}/full"], "--eval-file {tmp}/full does not exist (or is not a file)"),
    (
        ["--calib-dataset", "lee-news", "--calib-file", "{tmp}/file"],
        "--calib-dataset and --calib-file exclude each other; pass one",
    ),
    (["--remove", "0"], "--remove 0 is invalid: cannot remove 0 of 30 layers"),
    (["--remove", "29"], "cannot remove 29 of 30 layers of smollm2-135m (the first and last are protected)"),
    (["--block", "0"], "--block 0 is invalid; it must be >= 1"),
    (["--calib-windows", "-1"], "--calib-windows -1 is invalid"),
    (["--eval-windows", "0"], "--eval-windows 0 is invalid"),
    (["--num-clusters", "30"], "--num-clusters 30 is invalid; it must be an integer in [1, 29]"),
    (["--ridge", "-1"], "--ridge -1.0 is invalid; it must be a finite number >= 0"),
    (["--out", "{tmp}/full"], "--out {tmp}/full exists and is not empty"),
    (["--out", "{tmp}/file"], "--out {tmp}/file is a file"),
    (["--out", "{tmp}/file/sub"], "--out {tmp}/file/sub cannot be created: {tmp}/file is a file"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(args) for args, _ in BAD])
def test_bad_argument_is_one_line_exit_2_before_torch_loads(tmp_path, args, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    (tmp_path / "file").write_text("x")
    args, message = [a.format(tmp=tmp_path) for a in args], message.format(tmp=tmp_path)
    defaults = ["--remove", "6", "--out", str(tmp_path / "new")]  # a repeated option: the last one counts
    code, out, err, imported = probe("compress", *defaults, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {args[0]} ") and message in err, err
    assert imported == []  # answered before torch (over a second) was imported
    assert not (tmp_path / "new").exists()  # the check creates nothing


def test_the_console_script_answers_a_bad_argument_fast(tmp_path):
    args = [str(LEANTRAIN), "compress", "--remove", "6", "--out", str(tmp_path / "x"), "--select", "bogus"]
    seconds = []
    for _ in range(2):  # the faster of two runs: one slow start on a busy machine is not the CLI's fault
        started = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
    assert proc.returncode == 2
    assert proc.stderr == "error: --select 'bogus' is invalid; use one of lorp, shortgpt, streamline, last_n, auto\n"
    assert min(seconds) < 1.5, seconds


def test_good_arguments_pass(tmp_path):
    (tmp_path / "empty").mkdir()
    check_compress_args("smollm2-135m", 28, "last_n", "none", tmp_path / "empty", num_clusters=29, ridge=0)
    check_compress_args("smollm2-135m", 1, out=tmp_path / "a" / "b" / "c")
    check_compress_args("smollm2-135m", 6, out=None)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("value", [True, 2.0, "3"])
def test_remove_must_be_an_integer(value):
    with pytest.raises(ConfigError, match="--remove"):
        check_compress_args("smollm2-135m", value)


def test_ridge_must_be_finite():
    with pytest.raises(ConfigError, match="--ridge nan is invalid"):
        check_compress_args("smollm2-135m", 4, ridge=float("nan"))


def test_choices_match_the_methods():
    from leantrain.models import list_models
    from leantrain.prune.compress import SELECTIONS
    from leantrain.prune.ghosted import METHODS
    from leantrain.prune.lorp import PROTECT

    assert RECOVERIES == METHODS and PROTECTED == PROTECT and SELECTORS == (*SELECTIONS, "auto")
    assert CAUSAL_LMS == {"smollm2-135m": 30} and "30-layer" in list_models()["smollm2-135m"]
