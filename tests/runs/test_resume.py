"""`leantrain run resume=DIR`: the saved config continues the run; only budget and display keys may change; damaged
checkpoints are skipped with a one-line warning, never a traceback, never losing a good one."""

import json
from pathlib import Path

import pytest
import yaml

from cli_runner import run_cli

RECIPE = {
    "name": "digits-resume",
    "threads": 1,
    "progress": "plain",
    "data": {"dataset": "digits", "batch_size": 64},
    "model": {"name": "mlp", "hidden_sizes": [16]},
    "optim": {"name": "adamw", "lr": 0.003},
    "train": {"epochs": 2, "checkpoint_every": 5, "keep_checkpoints": 3},
}  # fmt: skip  (1,437 training digits / 64 -> 23 batches per epoch)


@pytest.fixture
def stopped_run(capsys, tmp_path) -> Path:
    """A run stopped by its budget after 12 of 46 steps (checkpoints at steps 5, 10 and 12)."""
    recipe = tmp_path / "digits-resume.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    code, _, err = run_cli(capsys, "run", str(recipe), f"output_dir={tmp_path / 'runs'}", "train.max_steps=12")
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def _steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


def test_resume_alone_continues_with_the_saved_recipe_and_may_train_longer(capsys, stopped_run):
    code, out, err = run_cli(capsys, "run", f"resume={stopped_run}", "train.max_steps=30")
    assert code == 0, err
    summary = json.loads((stopped_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 30 and summary["name"] == "digits-resume"
    assert "resuming after 12" in err.splitlines()[0]  # the start line
    steps = [json.loads(line)["step"] for line in (stopped_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 30


@pytest.mark.parametrize("override, key", [("lr=0.1", "optim.lr"), ("model.hidden_sizes=[8]", "model.hidden_sizes")])
def test_resume_refuses_a_change_naming_the_key(capsys, stopped_run, override, key):
    code, _, err = run_cli(capsys, "run", f"resume={stopped_run}", override)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {key} cannot change when resuming") and "train.max_steps" in err


def test_resume_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", f"resume={tmp_path}")
    assert code == 2 and err.startswith(f"error: resume={tmp_path} is not a run folder (no config.yaml)")


def test_a_truncated_newest_checkpoint_is_skipped_with_one_warning(capsys, stopped_run):
    assert _steps(stopped_run) == ["step-00000005", "step-00000010", "step-00000012"]
    weights = stopped_run / "checkpoints" / "step-00000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    code, _, err = run_cli(capsys, "run", f"resume={stopped_run}", "train.max_steps=14")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: skipping damaged checkpoint step-00000012 (model.safetensors does not match its recorded SHA-256 "
        "(truncated or overwritten)); moved to corrupt-step-00000012"
    ]
    assert "resuming after 10" in err
    assert (stopped_run / "checkpoints" / "corrupt-step-00000012").is_dir()
    assert json.loads((stopped_run / "summary.json").read_text())["steps"] == 14


def test_a_torn_state_json_is_skipped(capsys, stopped_run):
    state = stopped_run / "checkpoints" / "step-00000012" / "state.json"
    state.write_text(state.read_text()[:40])
    code, _, err = run_cli(capsys, "run", f"resume={stopped_run}", "train.max_steps=14")
    assert code == 0, err
    assert "skipping damaged checkpoint step-00000012 (state.json is unreadable (JSONDecodeError))" in err


def test_no_intact_checkpoint_is_one_line_and_exit_2(capsys, stopped_run):
    for ckpt in (stopped_run / "checkpoints").glob("step-*"):
        (ckpt / "optimizer.safetensors").write_bytes(b"\0" * 16)
    code, _, err = run_cli(capsys, "run", f"resume={stopped_run}")
    lines = err.strip().splitlines()
    assert code == 2 and len([line for line in lines if line.startswith("warning:")]) == 3
    assert lines[-1].startswith(f"error: resume={stopped_run}: none of the 3 checkpoints in ") and len(lines) == 4
    assert "Traceback" not in err


def test_old_spelling_recipe_plus_resume_still_checks_the_config(capsys, stopped_run, tmp_path):
    recipe = str(tmp_path / "digits-resume.yaml")
    code, _, err = run_cli(capsys, "run", recipe, "lr=0.1", f"resume={stopped_run}")
    assert code == 2 and "differs from the saved run in optim.lr" in err
    code, _, err = run_cli(capsys, "run", recipe, f"resume={stopped_run}", "train.max_steps=13")
    assert code == 0, err
