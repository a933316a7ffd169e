import csv
import sys

import pytest

from leantrain.errors import ConfigError, MissingDependencyError
from leantrain.train.metric_loggers import (
    LOG_FORMATS,
    CsvLogger,
    JsonlLogger,
    TensorBoardLogger,
    csv_name,
    open_metric_loggers,
    read_jsonl,
)


def _records(x_key="step", last=6):
    """Train records every x, val records every other x with different keys; val at 4 adds a new key."""
    out = []
    for x in range(1, last + 1):
        out.append({"split": "train", x_key: x, "epoch": 0, "loss": 1.0 / x, "lr": 0.1})
        if x % 2 == 0:
            val = {"split": "val", x_key: x, "epoch": 0, "loss": 2.0 / x, "accuracy": x / 10}
            if x >= 4:
                val["f1"] = x / 20  # a key the first val record did not have
            out.append(val)
    return out


def _read_csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _csv_matches_jsonl(run_dir):
    """Every CSV file holds exactly the JSONL records of its split, in order (cells compared as text)."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    names = {csv_name(r.get("split")) for r in records}
    assert {p.name for p in run_dir.glob("metrics*.csv")} == names
    for name in names:
        expected = [r for r in records if csv_name(r.get("split")) == name]
        rows = _read_csv(run_dir / name)
        assert len(rows) == len(expected)
        for row, record in zip(rows, expected, strict=True):
            assert {k: v for k, v in row.items() if v != ""} == {k: str(v) for k, v in record.items()}


def _log_all(loggers, records):
    for r in records:
        loggers.log(r)
    loggers.close()


def _scalars(log_dir, tag):
    """(steps, values) of one scalar as TensorBoard reads it back (values are stored as float32)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    events = acc.Scalars(tag)
    return [e.step for e in events], pytest.approx([e.value for e in events])


# ----------------------------------------------------------------------------- JSONL


def test_jsonl_drop_after_uses_the_x_key_and_keeps_records_without_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(path, x_key="round")
    _log_all(logger, [{"round": 1}, {"round": 2}, {"split": "test", "accuracy": 0.5}, {"round": 3}])
    JsonlLogger(path, x_key="round", drop_after=2).close()
    assert read_jsonl(path) == [{"round": 1}, {"round": 2}, {"split": "test", "accuracy": 0.5}]


def test_jsonl_appending_after_a_torn_line_keeps_the_new_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"st')  # killed mid-write
    _log_all(JsonlLogger(path), [{"step": 2}])
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


# ----------------------------------------------------------------------------- CSV


def test_csv_holds_the_jsonl_records_per_split_including_a_new_key(tmp_path):
    records = _records() + [{"note": "no split", "step": 7}]
    _log_all(open_metric_loggers(tmp_path, ["csv"]), records)
    assert read_jsonl(tmp_path / "metrics.jsonl") == records
    _csv_matches_jsonl(tmp_path)
    val = _read_csv(tmp_path / "metrics-val.csv")
    assert list(val[0]) == ["split", "step", "epoch", "loss", "accuracy", "f1"]
    assert [r["f1"] for r in val] == ["", "0.2", "0.3"]  # the new key is kept; earlier rows get empty cells
    assert list(_read_csv(tmp_path / "metrics-train.csv")[0]) == ["split", "step", "epoch", "loss", "lr"]
    assert _read_csv(tmp_path / "metrics.csv") == [{"note": "no split", "step": "7"}]


def test_csv_split_names_cannot_escape_the_run_folder(tmp_path):
    assert csv_name("client/3") == "metrics-client_3.csv"
    _log_all(CsvLogger(tmp_path), [{"split": "../x", "v": 1}])
    assert [p.name for p in tmp_path.iterdir()] == ["metrics-.._x.csv"]


def test_resume_rebuilds_csv_without_duplicate_rows_and_drops_rows_past_the_checkpoint(tmp_path):
    first = _records(last=6)
    _log_all(open_metric_loggers(tmp_path, ["jsonl", "csv"]), first)
    # Resume from a checkpoint at step 3, then train again to step 6.
    again = [r for r in _records(last=6) if r["step"] > 3]
    _log_all(open_metric_loggers(tmp_path, ["csv"], resume_after=3), again)

    expected = [r for r in first if r["step"] <= 3] + again
    assert read_jsonl(tmp_path / "metrics.jsonl") == expected
    _csv_matches_jsonl(tmp_path)
    steps = [int(r["step"]) for r in _read_csv(tmp_path / "metrics-train.csv")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_before_any_val_record_removes_the_stale_val_csv(tmp_path):
    _log_all(open_metric_loggers(tmp_path, ["csv"]), _records(last=4))
    _log_all(open_metric_loggers(tmp_path, ["csv"], resume_after=1), [])
    assert not (tmp_path / "metrics-val.csv").exists()
    _csv_matches_jsonl(tmp_path)


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_land_at_the_x_key_steps(tmp_path):
    records = _records(x_key="t_env")
    _log_all(open_metric_loggers(tmp_path, ["tensorboard"], x_key="t_env"), records)
    log_dir = tmp_path / "tensorboard"
    assert _scalars(log_dir, "train/loss") == ([1, 2, 3, 4, 5, 6], [1.0 / x for x in range(1, 7)])
    assert _scalars(log_dir, "val/accuracy") == ([2, 4, 6], [0.2, 0.4, 0.6])
    assert _scalars(log_dir, "val/f1") == ([4, 6], [0.2, 0.3])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"train/loss", "train/lr", "val/loss", "val/accuracy", "val/f1"}  # no t_env, split, epoch


def test_tensorboard_skips_records_without_the_x_key_and_non_numbers(tmp_path):
    logger = TensorBoardLogger(tmp_path, x_key="round")
    _log_all(logger, [{"split": "test", "accuracy": 0.9}, {"round": 2, "loss": 0.5, "name": "a", "ok": True}])
    assert _scalars(tmp_path, "loss") == ([2], [0.5])
    with pytest.raises(KeyError):
        _scalars(tmp_path, "accuracy")
    with pytest.raises(KeyError):
        _scalars(tmp_path, "ok")


def test_tensorboard_resume_purges_events_past_the_checkpoint(tmp_path):
    _log_all(open_metric_loggers(tmp_path, ["tensorboard"], x_key="round"), _records(x_key="round", last=6))
    # A resumed run that has not logged yet: rounds 4-6 of the first session must already be gone (TensorBoard's
    # own out-of-order detection would only catch them once a new, earlier step arrives).
    resumed = open_metric_loggers(tmp_path, ["tensorboard"], x_key="round", resume_after=3)
    assert _scalars(tmp_path / "tensorboard", "train/loss") == ([1, 2, 3], [1.0, 0.5, 1 / 3])
    _log_all(resumed, [{"split": "train", "round": x, "loss": 10.0 + x} for x in (4, 5)])
    expected = ([1, 2, 3, 4, 5], [1.0, 0.5, 1 / 3, 14.0, 15.0])
    assert _scalars(tmp_path / "tensorboard", "train/loss") == expected


def test_missing_tensorboard_raises_the_install_command_before_touching_metrics(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 5}\n')
    with pytest.raises(MissingDependencyError) as err:
        open_metric_loggers(tmp_path, ["csv", "tensorboard"], resume_after=1)
    assert err.value.what == "tensorboard"
    assert 'pip install -c constraints.txt "leantrain[tensorboard]"' in str(err.value)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1}, {"step": 5}]
    assert not list(tmp_path.glob("*.csv"))


# ----------------------------------------------------------------------------- factory


def test_unknown_format_names_it_and_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        open_metric_loggers(tmp_path, ["csv", "wandb"])
    message = str(err.value)
    assert "wandb" in message and all(f in message for f in LOG_FORMATS)
    assert not list(tmp_path.iterdir())


def test_jsonl_is_always_written(tmp_path):
    _log_all(open_metric_loggers(tmp_path, []), [{"step": 1, "loss": 0.5}])
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
