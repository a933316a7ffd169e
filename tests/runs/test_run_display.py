"""Every run kind: one start line and progress on stderr, results on stdout, and the metric files chosen by
``log_formats`` (CSV per split, TensorBoard scalars against the kind's x axis)."""

import csv
import json
from pathlib import Path

import pytest

from cli_runner import run_cli
from leantrain.config import resolve
from leantrain.runs.launch import run
from leantrain.train.metric_loggers import csv_name, read_jsonl

SMALL = {
    "supervised": ("var-mlp-digits", ["train.max_steps=30", "train.log_every=10", "prune.eval_sparsities=[]"], "step"),
    "federated": ("fedavg-fashion-mnist", ["data.dataset=digits", "model.channels=[4,8]", "federated.rounds=3",
                                           "federated.num_clients=4", "federated.clients_per_round=2",
                                           "federated.local_steps=2", "federated.eval_every=1"], "round"),
    "marl": ("qmix-climbing", ["marl.max_steps=120", "marl.eval_every=60", "marl.test_episodes=2",
                               "marl.log_every_episodes=8"], "t_env"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_start_line_and_progress_on_stderr_results_on_stdout(capsys, tmp_path, kind):
    recipe, overrides, _ = SMALL[kind]
    code, out, err = run_cli(
        capsys, "run", recipe, *overrides, "progress=plain", f"output_dir={tmp_path}", "threads=1"
    )
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    first = err.splitlines()[0]
    assert first.startswith(f"run {run_dir}: ") and ", device cpu, 1 thread" in first
    unit = {"supervised": "step ", "federated": "round ", "marl": "env step "}[kind]
    assert any(line.startswith(unit) for line in err.splitlines()[1:])  # progress lines, on stderr only
    assert not any(line.startswith(unit) for line in out.splitlines())
    assert f"run folder: {run_dir}" in out and "completed" in out


class CountingProgress:
    def __init__(self):
        self.advanced, self.updated, self.messages = [], [], []

    def advance(self, done):
        self.advanced.append(done)

    def update(self, done, metrics):
        self.updated.append(done)

    def message(self, text):
        self.messages.append(text)

    def close(self):
        pass


def test_the_bar_moves_on_every_step_not_only_at_logged_ones(tmp_path, monkeypatch):
    import leantrain.runs.supervised as supervised

    shown = CountingProgress()
    monkeypatch.setattr(supervised, "make_progress", lambda *args, **kwargs: shown)
    run(resolve("var-mlp-digits", [*SMALL["supervised"][1], "progress=none", f"output_dir={tmp_path}"]))
    assert sorted(shown.advanced + shown.updated) == list(range(1, 31))  # every step, once
    assert shown.updated == [10, 20, 30]
    assert shown.messages[-1] == "final evaluation on the val and test splits"


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_log_formats_write_csv_and_tensorboard_beside_the_jsonl(tmp_path, kind):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe, overrides, x_key = SMALL[kind]
    cfg = resolve(recipe, [*overrides, "log_formats=[jsonl,csv,tensorboard]", "progress=none",
                           f"output_dir={tmp_path}", "threads=1"])  # fmt: skip
    run_dir = run(cfg).run_dir
    records = read_jsonl(run_dir / "metrics.jsonl")
    splits = {r.get("split") for r in records}
    for split in splits:
        with (run_dir / csv_name(split)).open() as f:
            rows = list(csv.DictReader(f))
        mine = [r for r in records if r.get("split") == split]
        assert [float(row[x_key]) for row in rows] == [float(r[x_key]) for r in mine]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert tags
    numeric = next(r for r in reversed(records) if any(isinstance(v, float) for v in r.values()))
    name = next(k for k, v in numeric.items() if isinstance(v, float) and k != x_key)
    tag = f"{numeric['split']}/{name}" if numeric.get("split") else name
    assert events.Scalars(tag)[-1].step == int(numeric[x_key])


def test_an_unknown_log_format_is_refused_by_the_config():
    from leantrain.errors import ConfigError

    with pytest.raises(ConfigError, match="log_formats = 'wandb' is not one of: jsonl, csv, tensorboard"):
        resolve("quickstart", ["log_formats=[jsonl,wandb]"])


def test_summary_says_the_kind(tmp_path):
    summary = json.loads(
        (run(resolve("qmix-climbing", [*SMALL["marl"][1], "progress=none", f"output_dir={tmp_path}"])).run_dir
         / "summary.json").read_text()
    )  # fmt: skip
    assert summary["kind"] == "marl" and Path(summary["run_dir"]).parent == tmp_path
