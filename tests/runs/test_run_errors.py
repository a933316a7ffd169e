"""What a user sees when things go wrong: one line, the right exit code, a crash report for bugs, and run folders
that never leave output_dir."""

import json

import pytest
import yaml

from cli_runner import run_cli
from leantrain.config import resolve, to_dict
from leantrain.crash_report import one_line
from leantrain.errors import ConfigError
from leantrain.optim.ascent_worker import AscentProcessError

DIGITS = {"name": "d", "threads": 1, "progress": "none", "data": {"dataset": "digits"}, "model": {"name": "mlp"},
          "train": {"max_steps": 3}}  # fmt: skip


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_unexpected_exception_is_one_line_exit_1_and_a_report_in_the_run_folder(capsys, tmp_path, monkeypatch):
    import leantrain.runs.supervised as supervised

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(supervised, "prepare_data", broken)
    recipe = tmp_path / "d.yaml"
    recipe.write_text(yaml.safe_dump(DIGITS))
    code, _, err = run_cli(capsys, "run", str(recipe), f"output_dir={tmp_path / 'runs'}")
    (run_dir,) = (tmp_path / "runs").iterdir()
    line = _one_error_line(err)
    assert code == 1
    assert line == f"error: unexpected RuntimeError: boom (full traceback in {run_dir / 'error.log'})"
    report = (run_dir / "error.log").read_text()
    assert "Traceback" in report and "second line" in report and "def broken" not in line
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: boom"


def test_an_unexpected_exception_outside_a_run_reports_to_the_cache(capsys, tmp_path, monkeypatch):
    import leantrain.runs.report as report

    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(report, "report_rows", lambda dirs: 1 / 0)
    code, _, err = run_cli(capsys, "report", str(tmp_path))
    line = _one_error_line(err)
    assert code == 1 and line.startswith("error: unexpected ZeroDivisionError: division by zero (full traceback in ")
    (crash,) = (tmp_path / "cache" / "crashes").iterdir()
    assert str(crash) in line and "ZeroDivisionError" in crash.read_text()


def test_a_recipe_that_is_not_utf8_is_a_user_error(capsys, tmp_path):
    recipe = tmp_path / "latin.yaml"
    recipe.write_bytes("name: caf\xe9\n".encode("latin-1"))
    code, _, err = run_cli(capsys, "run", str(recipe))
    assert code == 2 and _one_error_line(err) == f"error: recipe {recipe} is not UTF-8 text (byte 9); save it as UTF-8"


def test_an_output_dir_that_cannot_be_created_is_a_user_error(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    recipe = tmp_path / "d.yaml"
    recipe.write_text(yaml.safe_dump(DIGITS))
    code, _, err = run_cli(capsys, "run", str(recipe), f"output_dir={blocker / 'runs'}")
    assert code == 2
    assert _one_error_line(err).startswith(f"error: output_dir='{blocker / 'runs'}' cannot be created (")


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "a\\b", ""])
def test_run_names_that_could_leave_output_dir_are_refused(name):
    with pytest.raises(ConfigError, match="is not a valid run name"):
        resolve({**DIGITS, "name": name})


def test_a_worker_traceback_becomes_one_line_with_the_traceback_kept():
    text = 'Traceback (most recent call last):\n  File "w.py", line 3, in f\nValueError: bad shape\n'
    err = AscentProcessError(text)
    assert one_line(err) == "AscentProcessError: AsyncSAM's ascent process failed: ValueError: bad shape"
    assert err.details == text


# ---------------------------------------------------------------- keys by run kind


@pytest.mark.parametrize(
    "recipe, override, message",
    [
        ("qmix-climbing", "train.max_steps=5", "train.max_steps is not used by marl recipes (this recipe: "
                                               "qmix-climbing); use marl.max_steps"),
        ("qmix-climbing", "optim.lr=0.1", "optim.lr is not used by marl recipes (this recipe: qmix-climbing); use "
                                          "marl.lr"),
        ("fedavg-fashion-mnist", "train.eval_every=5", "train.eval_every is not used by federated recipes (this "
                                                       "recipe: fedavg-fashion-mnist); use federated.eval_every"),
        ("fedavg-fashion-mnist", "optim.name=adamw", "optim.name is not used by federated recipes"),
        ("quickstart", "marl.max_steps=5", "marl.max_steps is not used by supervised recipes (this recipe: "
                                           "quickstart); use train.max_steps"),
    ],
)  # fmt: skip
def test_a_key_the_recipe_kind_ignores_is_an_error_naming_the_key_that_applies(recipe, override, message):
    with pytest.raises(ConfigError) as err:
        resolve(recipe, [override])
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    "recipe, leaf, path",
    [("qmix-climbing", "lr", "marl.lr"), ("quickstart", "lr", "optim.lr"), ("fedavg-fashion-mnist", "lr", "optim.lr"),
     ("qmix-climbing", "eval_every", "marl.eval_every"), ("quickstart", "eval_every", "train.eval_every"),
     ("fedavg-fashion-mnist", "eval_every", "federated.eval_every"), ("qmix-climbing", "max_steps", "marl.max_steps"),
     ("quickstart", "checkpoint_every", "train.checkpoint_every"),
     ("fedavg-fashion-mnist", "checkpoint_every", "federated.checkpoint_every")],
)  # fmt: skip
def test_one_spelling_per_concept_resolves_to_the_kinds_key(recipe, leaf, path):
    cfg = resolve(recipe, [f"{leaf}=7"])
    section, key = path.split(".")
    assert getattr(getattr(cfg, section), key) == 7


def test_print_config_shows_only_the_sections_the_kind_uses(capsys):
    code, out, _ = run_cli(capsys, "run", "qmix-climbing", "--print-config")
    shown = yaml.safe_load(out)
    assert code == 0 and {"marl", "name", "seed"} <= set(shown)
    assert not {"train", "optim", "data", "model", "finetune", "federated", "lowrank", "prune", "task"} & set(shown)
    code, out, _ = run_cli(capsys, "run", "fedavg-fashion-mnist", "--print-config")
    shown = yaml.safe_load(out)
    assert set(shown["optim"]) == {"lr", "momentum", "weight_decay"} and "train" not in shown
    assert set(shown["data"]) == {"dataset", "train_subset", "batch_size"}


def test_the_unknown_key_error_lists_close_matches_not_every_key():
    with pytest.raises(ConfigError) as err:
        resolve("quickstart", ["optim.lrr=1"])
    message = str(err.value)
    assert message.startswith("unknown config key 'optim.lrr'; did you mean: optim.lr")
    assert len(message) < 300 and "lowrank" not in message


def test_saved_config_round_trips_through_the_used_keys():
    cfg = resolve("fedavg-fashion-mnist", ["federated.rounds=3"])
    saved = to_dict(cfg, used_only=True)
    assert to_dict(resolve(saved), used_only=True) == saved
