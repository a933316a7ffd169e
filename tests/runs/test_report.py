"""`leantrain report` and `plot` on hand-made run folders of each kind (supervised, federated, MARL) and status."""

import json
from pathlib import Path

import pytest
import yaml

from cli_runner import run_cli
from leantrain.errors import LeantrainError
from leantrain.runs.report import legend_labels, plot_curves, read_run, report_rows

CONFIGS = {
    "supervised": {
        "name": "cnn-fashion-mnist", "output_dir": "runs", "threads": 1, "progress": "plain", "resume": None,
        "optim": {"name": "adamw", "lr": 0.003}, "model": {"hidden_sizes": [64]},
        "federated": {"algorithm": None}, "marl": {"env": None},
    },
    "federated": {
        "name": "fedavg-fashion-mnist", "output_dir": "runs", "optim": {"lr": 0.05},
        "federated": {"algorithm": "fedavg", "rounds": 4}, "marl": {"env": None},
    },
    "marl": {
        "name": "qmix-climbing", "output_dir": "runs", "federated": {"algorithm": None},
        "marl": {"env": "climbing", "t_max": 200},
    },
}  # fmt: skip
RECORDS = {
    "supervised": [
        {"split": "train", "step": 10, "epoch": 0, "loss": 1.5, "accuracy": 0.4, "lr": 0.003, "elapsed_s": 1.0},
        {"split": "val", "step": 15, "epoch": 1, "loss": 1.2, "accuracy": 0.55, "elapsed_s": 1.5},
        {"split": "train", "step": 20, "epoch": 1, "loss": 1.0, "accuracy": 0.6, "lr": 0.002, "elapsed_s": 2.0},
        {"split": "val", "step": 30, "epoch": 2, "loss": 0.9, "accuracy": 0.7, "elapsed_s": 3.0},
        {"split": "train", "step": 40, "epoch": 2, "loss": 0.8, "accuracy": 0.75, "lr": 0.001, "elapsed_s": 4.0},
    ],
    "federated": [
        {"round": 0, "cohort": 4, "train_loss": 2.0, "up_bytes": 1000, "events": []},
        {"round": 1, "cohort": 4, "train_loss": 1.5, "up_bytes": 1000, "test_accuracy": 0.5, "test_loss": 1.4},
        {"round": 2, "cohort": 4, "train_loss": 1.2, "up_bytes": 1000, "events": ["client 3 dropped"]},
        {"round": 3, "cohort": 4, "train_loss": 1.0, "up_bytes": 1000, "test_accuracy": 0.6, "test_loss": 1.1},
    ],
    "marl": [
        {"split": "test", "t_env": 0, "episodes": 0, "return_mean": -10.0},
        {"split": "train", "t_env": 50, "episodes": 10, "return_mean": -5.0, "epsilon": 0.9, "loss": 3.0},
        {"split": "test", "t_env": 100, "episodes": 20, "return_mean": 2.0},
        {"split": "resume", "t_env": 100, "episodes": 20, "from": "t_env-100"},
        {"split": "train", "t_env": 150, "episodes": 30, "return_mean": 4.0, "epsilon": 0.5, "loss": 1.0},
    ],
}
LAST_EVAL = {
    "supervised": {"val_loss": 0.9, "val_accuracy": 0.7},
    "federated": {"test_accuracy": 0.6, "test_loss": 1.1},
    "marl": {"test_return": 2.0},
}
PROGRESS = {"supervised": ("steps", 40), "federated": ("rounds", 4), "marl": ("t_env", 150)}
X_AXIS = {"supervised": "step", "federated": "round", "marl": "t_env"}


def make_run(root: Path, folder: str, config: dict, records: list | None = None, summary: dict | None = None) -> Path:
    """A run folder written by hand: config.yaml, and metrics.jsonl / summary.json when given."""
    run_dir = root / folder
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if records is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def summary_of(kind: str, status: str, **extra) -> dict:
    key, done = {"supervised": ("steps", 40), "federated": ("rounds_done", 4), "marl": ("t_env", 150)}[kind]
    final = {"completed": {"final": {"test_metric": 0.123}}}.get(status, {})
    return {"name": CONFIGS[kind]["name"], "status": status, key: done, "wall_time_s": 5.0, **final, **extra}


@pytest.fixture
def runs_of_every_status(tmp_path) -> dict[tuple[str, str], Path]:
    """(kind, status) -> run folder, for every kind and completed / interrupted / failed / killed / empty."""
    folders = {}
    for kind, config in CONFIGS.items():
        records = RECORDS[kind]
        folders[kind, "completed"] = make_run(tmp_path, f"{kind}-ok", config, records, summary_of(kind, "completed"))
        folders[kind, "interrupted"] = make_run(
            tmp_path, f"{kind}-int", config, records, summary_of(kind, "interrupted")
        )
        failed = summary_of(kind, "failed", error="RuntimeError: CUDA out of memory\nwhile allocating")
        folders[kind, "failed"] = make_run(tmp_path, f"{kind}-fail", config, records, failed)
        folders[kind, "killed"] = make_run(tmp_path, f"{kind}-killed", config, records)
        folders[kind, "empty"] = make_run(tmp_path, f"{kind}-empty", config)
    return folders


# ---------------------------------------------------------------- report


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_report_rows_for_every_status(kind, runs_of_every_status, capsys):
    statuses = ("completed", "interrupted", "failed", "killed", "empty")
    rows = report_rows([runs_of_every_status[kind, s] for s in statuses])
    err = capsys.readouterr().err
    assert [row["status"] for row in rows] == ["completed", "interrupted", "failed", "incomplete"]
    assert all(row["kind"] == kind for row in rows)
    column, done = PROGRESS[kind]
    assert [row[column] for row in rows] == [done] * 4
    completed, interrupted, failed, killed = rows
    assert completed["test_metric"] == 0.123 and "val_loss" not in completed  # final metrics, not the records
    assert failed["error"].startswith("RuntimeError: CUDA out of memory")
    for row in (interrupted, failed, killed):  # no final metrics: the last logged evaluation stands in
        assert {k: row[k] for k in LAST_EVAL[kind]} == LAST_EVAL[kind]
    assert f"skipped {runs_of_every_status[kind, 'empty']}: no data yet" in err
    assert f"{runs_of_every_status[kind, 'killed']}: incomplete (no summary.json" in err


def test_report_table_mixes_kinds_on_stdout_and_notes_on_stderr(runs_of_every_status, tmp_path, capsys):
    folders = [runs_of_every_status[k, s] for k in CONFIGS for s in ("completed", "failed", "killed", "empty")]
    code, out, err = run_cli(capsys, "report", *map(str, folders), str(tmp_path / "missing"))
    assert code == 0, err
    for kind in CONFIGS:
        assert f"{kind}-ok" in out and f"{kind}-killed" in out and f"{kind}-empty" not in out
    assert out.count("completed") == 3 and out.count("failed") == 3 and out.count("incomplete") == 3
    assert "CUDA out of memory while allocating" in out  # the error column, folded onto one line
    assert "skipped" not in out and "error:" not in err
    assert f"skipped {tmp_path / 'missing'}: not a run folder (no config.yaml)" in err
    assert err.count("no data yet") == 3


def test_resumed_then_killed_run_is_incomplete_despite_old_summary(tmp_path, capsys):
    old = summary_of("supervised", "interrupted") | {"steps": 20}  # records go on to step 40 after the resume
    run_dir = make_run(tmp_path, "resumed", CONFIGS["supervised"], RECORDS["supervised"], old)
    (row,) = report_rows([run_dir])
    assert row["status"] == "incomplete" and row["steps"] == 40 and row["val_accuracy"] == 0.7
    assert "records go past its summary.json" in capsys.readouterr().err


def test_summary_torn_by_a_kill_reads_as_incomplete(tmp_path):
    run_dir = make_run(tmp_path, "torn", CONFIGS["marl"], RECORDS["marl"])
    (run_dir / "summary.json").write_text('{"status": "compl')
    (row,) = report_rows([run_dir])
    assert row["status"] == "incomplete" and row["t_env"] == 150 and row["test_return"] == 2.0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: root / "nonexistent-run", "nonexistent-run: not a run folder (no config.yaml)"),
        (lambda root: make_run(root, "fresh", CONFIGS["supervised"]), "fresh: no data yet"),
    ],
)
def test_report_with_nothing_reportable_exits_2_with_one_line(make, message, tmp_path, capsys):
    folder = make(tmp_path)
    with pytest.raises(LeantrainError, match="nothing to report"):
        report_rows([folder])
    code, _, err = run_cli(capsys, "report", str(folder))
    assert code == 2
    assert err.startswith(f"error: nothing to report: {tmp_path}") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ---------------------------------------------------------------- plot


@pytest.mark.parametrize(
    "kind, metric, ylabel, xs, ys",
    [
        ("supervised", "loss", "val loss", [15, 30], [1.2, 0.9]),
        ("supervised", "train_accuracy", "train accuracy", [10, 20, 40], [0.4, 0.6, 0.75]),
        ("federated", "accuracy", "test_accuracy", [1, 3], [0.5, 0.6]),  # evaluated rounds only
        ("federated", "train_loss", "train_loss", [0, 1, 2, 3], [2.0, 1.5, 1.2, 1.0]),
        ("marl", "return", "test return_mean", [0, 100], [-10.0, 2.0]),
        ("marl", "train_loss", "train loss", [50, 150], [3.0, 1.0]),
    ],
)
def test_plot_uses_each_kinds_x_axis_and_default_records(kind, metric, ylabel, xs, ys, runs_of_every_status):
    plot = plot_curves([runs_of_every_status[kind, "completed"]], metric)
    assert plot.x == X_AXIS[kind]
    (curve,) = plot.curves
    assert (curve.xs, curve.ys, curve.ylabel) == (xs, ys, ylabel)


def test_plot_explicit_split_and_federated_bare_loss(runs_of_every_status):
    (sup,) = plot_curves([runs_of_every_status["supervised", "killed"]], "loss", split="train").curves
    assert sup.xs == [10, 20, 40] and sup.ylabel == "train loss"
    (fed,) = plot_curves([runs_of_every_status["federated", "failed"]], "loss").curves
    assert fed.ylabel == "test_loss" and fed.ys == [1.4, 1.1]
    (fed_train,) = plot_curves([runs_of_every_status["federated", "failed"]], "loss", split="train").curves
    assert fed_train.ylabel == "train_loss"


def test_plot_cli_writes_a_png_for_every_kind_and_status(runs_of_every_status, tmp_path, capsys):
    for kind in CONFIGS:
        png = tmp_path / f"{kind}.png"
        folders = [str(runs_of_every_status[kind, s]) for s in ("completed", "interrupted", "failed", "killed")]
        metric = {"marl": "return"}.get(kind, "accuracy")
        code, out, err = run_cli(capsys, "plot", *folders, "--metric", metric, "--out", str(png))
        assert code == 0, err
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in out


def test_legend_names_recipe_and_differing_overrides(tmp_path):
    base = CONFIGS["federated"]
    slow = make_run(tmp_path, "fedavg-a", base, RECORDS["federated"])
    fast = make_run(tmp_path, "fedavg-b", base | {"optim": {"lr": 0.1}, "threads": 8}, RECORDS["federated"])
    other = make_run(tmp_path, "fedavg-c", base | {"output_dir": "elsewhere", "resume": "x"}, RECORDS["federated"])
    plot = plot_curves([slow, fast, other], "accuracy")
    # threads, output_dir and resume never make a difference worth a label; identical labels fall back to folders
    assert [c.label for c in plot.curves] == ["fedavg-a", "fedavg-fashion-mnist optim.lr=0.1", "fedavg-c"]


def test_legend_compares_runs_of_the_same_recipe_with_dotted_nested_keys(tmp_path):
    sup = CONFIGS["supervised"]
    runs = [
        make_run(tmp_path, "a", CONFIGS["federated"], RECORDS["federated"]),
        make_run(tmp_path, "b", CONFIGS["federated"] | {"optim": {"lr": 0.1}}, RECORDS["federated"]),
        make_run(tmp_path, "c", sup, RECORDS["supervised"]),
        make_run(tmp_path, "d", sup | {"model": {"hidden_sizes": [64, 32]}}, RECORDS["supervised"]),
    ]
    assert legend_labels([read_run(run) for run in runs]) == [
        "fedavg-fashion-mnist optim.lr=0.05",
        "fedavg-fashion-mnist optim.lr=0.1",
        "cnn-fashion-mnist model.hidden_sizes=[64]",  # not optim.lr: it differs only from another recipe's runs
        "cnn-fashion-mnist model.hidden_sizes=[64,32]",
    ]


def test_plot_refuses_runs_with_different_x_axes(runs_of_every_status, capsys):
    folders = [str(runs_of_every_status[k, "completed"]) for k in ("supervised", "federated")]
    code, _, err = run_cli(capsys, "plot", *folders)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot plot supervised (x: step), federated (x: round) runs on one x axis" in err


def test_plot_skips_runs_lacking_the_metric_and_lists_what_is_available(runs_of_every_status, tmp_path, capsys):
    perplexity = make_run(
        tmp_path, "lm", CONFIGS["supervised"] | {"name": "tinygpt"}, [{"split": "val", "step": 5, "perplexity": 9.0}]
    )
    plot = plot_curves([runs_of_every_status["supervised", "completed"], perplexity], "perplexity")
    assert [c.label for c in plot.curves] == ["tinygpt"]
    assert f"skipped {runs_of_every_status['supervised', 'completed']}: no 'perplexity' in its val records" in (
        capsys.readouterr().err
    )
    code, _, err = run_cli(capsys, "plot", str(runs_of_every_status["supervised", "completed"]), "--metric", "bleu")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no run has 'bleu'" in err
    assert "available metrics: train: accuracy, elapsed_s, loss, lr; val: accuracy, elapsed_s, loss" in err
    with pytest.raises(LeantrainError, match=r"rounds: cohort, test_accuracy, test_loss, train_loss, up_bytes"):
        plot_curves([runs_of_every_status["federated", "killed"]], "bleu")


def test_plot_with_no_records_at_all_says_why(runs_of_every_status, tmp_path):
    no_metrics = make_run(tmp_path, "summary-only", CONFIGS["marl"], None, summary_of("marl", "failed"))
    with pytest.raises(LeantrainError, match="nothing to plot: no metrics.jsonl in the given runs"):
        plot_curves([no_metrics, runs_of_every_status["marl", "empty"]], "return")


def _finetune_run(root: Path, name: str, accuracy: float, pct: float) -> Path:
    summary = {"name": name, "kind": "supervised", "status": "completed", "steps": 100, "trainable_pct": pct,
               "step_time_s_median": 0.3, "peak_rss_mb": 900.0,
               "final": {"val_accuracy": accuracy, "test_loss": 0.8, "test_accuracy": accuracy}}  # fmt: skip
    return make_run(root, f"{name}-20261207-000000", {"name": name}, [], summary)


def test_report_against_a_baseline_says_which_runs_fall_short(tmp_path, capsys):
    runs = [_finetune_run(tmp_path, "full-minilm-tweets", 0.72, 100.0), _finetune_run(tmp_path, "lora", 0.70, 0.33),
            _finetune_run(tmp_path, "gem", 0.64, 0.1)]  # fmt: skip
    code, out, err = run_cli(capsys, "report", *map(str, runs), "--baseline", "full-minilm-tweets", "--tolerance",
                             "0.04")  # fmt: skip
    assert code == 0, err
    assert "trainable_pct" in out and "step_time_s_median" in out and "peak_rss_mb" in out
    lines = [line for line in out.splitlines() if "of full-minilm-tweets" in line]
    assert lines == [
        "lora: test_accuracy 0.7000 vs 0.7200 (-0.0200): within 0.04 of full-minilm-tweets",
        "gem: test_accuracy 0.6400 vs 0.7200 (-0.0800): NOT within 0.04 of full-minilm-tweets",
    ]


def test_report_baseline_that_is_not_among_the_runs(tmp_path, capsys):
    run = _finetune_run(tmp_path, "lora", 0.70, 0.33)
    code, _, err = run_cli(capsys, "report", str(run), "--baseline", "full")
    assert code == 2 and err.startswith("error: --baseline 'full' is none of the reported runs (lora)")
