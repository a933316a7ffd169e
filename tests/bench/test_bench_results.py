"""The benchmark results file, rewritten atomically after every finished row, and the per-unit progress lines."""

import json
import threading

import pytest

from leantrain.bench import prune, report
from leantrain.bench.report import ROW_FIELDS, BenchResults, Progress


def row(method: str, **extra) -> dict:
    return {"method": method, "anchor": False, "metric": 0.5, "seeds": 1, "table_only": "x", "extra": extra}


def read(path) -> dict:
    return json.loads(path.read_text())


def test_the_document_holds_exactly_the_rows_so_far_until_finish(tmp_path):
    results = BenchResults("demo", tmp_path / "out", threads=1, quick=True)
    assert not results.path.exists()  # nothing is written (or overwritten) before the first row
    results.add(row("a", n=1))
    doc = read(tmp_path / "out" / "demo.json")
    assert doc["complete"] is False and [r["method"] for r in doc["rows"]] == ["a"]
    assert {k: doc[k] for k in ("area", "threads", "quick")} == {"area": "demo", "threads": 1, "quick": True}
    assert set(doc["rows"][0]) == {*ROW_FIELDS, "extra"} and doc["rows"][0]["extra"] == {"n": 1}
    assert doc["rows"][0]["trainable_params"] is None  # every standard field, None when the row lacks it
    results.add_rows([row("b"), row("c")])
    doc = read(results.path)
    assert doc["complete"] is False and [r["method"] for r in doc["rows"]] == ["a", "b", "c"]
    assert "targets" not in doc
    results.rows[0]["extra"]["ratio"] = 2.0  # a ratio filled in after the row was added lands in the next write
    path = results.finish({"targets": {"a>b": True}, "wall_time_s": 1.5})
    doc = read(path)
    assert path == results.path and doc["complete"] is True
    assert doc["targets"] == {"a>b": True} and doc["wall_time_s"] == 1.5
    assert [r["method"] for r in doc["rows"]] == ["a", "b", "c"] and doc["rows"][0]["extra"]["ratio"] == 2.0


def test_a_failed_write_leaves_the_previous_document_and_no_temporary_file(tmp_path, monkeypatch):
    results = BenchResults("demo", tmp_path, threads=1, quick=False)
    results.add(row("a"))
    before = results.path.read_text()
    with pytest.raises(TypeError):
        results.add(row("b", bad=object()))  # not JSON: fails before the disk is touched
    assert results.path.read_text() == before
    results.rows.pop()

    def crash(src, dst):
        raise OSError("disk gone between write and rename")

    monkeypatch.setattr(report.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        results.add(row("c"))
    assert results.path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["demo.json"]


def test_a_concurrent_reader_never_sees_a_torn_file(tmp_path):
    results = BenchResults("demo", tmp_path, threads=1, quick=True)
    results.add(row("first"))
    done, seen, torn = threading.Event(), [], []

    def reader():
        while not done.is_set():
            text = results.path.read_text()
            try:
                seen.append(len(json.loads(text)["rows"]))
            except json.JSONDecodeError:
                torn.append(len(text))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(100):  # rows of ~4 KB each: a file growing to ~400 KB, rewritten 100 times
            results.add(row(f"m{i}", curve=list(range(500))))
    finally:
        done.set()
        thread.join()
    assert torn == [] and len(seen) > 0
    assert seen == sorted(seen)  # every read is a whole document, never an older one after a newer one


def test_progress_lines_number_the_units_on_stderr(capsys):
    units = Progress("optim accuracy", 2)
    with units.unit("lwsam seed 0"):
        pass
    with units.unit("lwsam seed 1"):
        pass
    with report.progress("marl lbf: s2q seed 0", 3):
        pass
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == "[1/2] optim accuracy: lwsam seed 0" and lines[2] == "[2/2] optim accuracy: lwsam seed 1"
    assert lines[1].startswith("[1/2] ... done in ") and lines[1].endswith(" s")
    assert lines[4] == "[3] marl lbf: s2q seed 0" and lines[5].startswith("[3] ... done in ")


def fake_arm(recipe, overrides, arm, seed, tmp) -> dict:
    dense = {"plain": 0.97, "var": 0.965, "sam": 0.975}[arm] - 0.01 * seed
    return {"dense": dense, "pruned": {s: dense * (1 - s) for s in prune.SPARSITIES}, "train_time_s": 1.0,
            "trainable_params": 123}  # fmt: skip


def test_prune_bench_interrupted_after_its_first_row_keeps_that_row(tmp_path, monkeypatch, capsys):
    calls = []

    def run_arm(*args):
        calls.append(args[2])
        if len(calls) > 1:
            raise KeyboardInterrupt
        return fake_arm(*args)

    monkeypatch.setattr(prune, "run_arm", run_arm)
    with pytest.raises(KeyboardInterrupt):
        prune.run_bench(True, tmp_path, seeds=1, parts=("mlp",))
    doc = read(tmp_path / "prune-mlp.json")
    assert doc["complete"] is False and "targets" not in doc
    assert [(r["method"], r["metric"], r["seeds"]) for r in doc["rows"]] == [("mlp-plain", 0.97, 1)]
    assert doc["rows"][0]["extra"]["pruned"]["0.9"]["mean"] == pytest.approx(0.097)
    out, err = capsys.readouterr()
    assert out == ""  # the tables come at the end only
    assert "[1/3] prune mlp: plain seed 0\n" in err and "[2/3] prune mlp: var seed 0\n" in err
    assert "[1/3] ... done in" in err and "[2/3] ... done" not in err


def test_prune_bench_adds_a_row_when_its_last_seed_finishes(tmp_path, monkeypatch, capsys):
    path = tmp_path / "prune-mlp.json"
    rows_seen = []

    def run_arm(*args):
        rows_seen.append(len(read(path)["rows"]) if path.exists() else 0)
        return fake_arm(*args)

    monkeypatch.setattr(prune, "run_arm", run_arm)
    assert prune.run_bench(True, tmp_path, seeds=2, parts=("mlp",)) == path
    assert rows_seen == [0, 0, 0, 0, 1, 2]  # seed 0 of every arm, then seed 1: plain, var, sam
    doc = read(path)
    assert doc["complete"] is True and set(doc["targets"]) == {
        "mlp_var_at_90%>=plain+5pts",
        "mlp_var_dense_within_1pt",
    }
    assert [r["method"] for r in doc["rows"]] == ["mlp-plain", "mlp-var", "mlp-sam"]
    assert all(r["seeds"] == 2 and r["trainable_params"] == 123 for r in doc["rows"])
    assert doc["rows"][0]["metric"] == pytest.approx(0.965) and "dense" not in doc["rows"][0]  # table column only
    out, err = capsys.readouterr()
    assert "| mlp-plain |" in out and "Targets:" in out and "[1/6]" not in out
    assert [line.split(" ... ")[0] for line in err.splitlines() if "done in" in line] == [
        f"[{i}/6]" for i in range(1, 7)
    ]
