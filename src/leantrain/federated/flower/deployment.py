"""Start Flower on loopback for tests and demos, run an app, and stop every process started, by PID.

:class:`LocalDeployment` starts a SuperLink and N SuperNodes (``--node-config "partition-id=i num-partitions=N"``)
on free 127.0.0.1 ports, then ``flwr run <app> <connection> --stream``. :class:`LocalSimulation` starts a SuperLink
in simulation mode (Flower's Ray simulation engine with ``num-supernodes`` virtual nodes). Both keep their state
under a private ``FLWR_HOME`` (a temporary directory by default), disable telemetry, the update check and the
runtime ``uv sync`` of app dependencies (leantrain and torch must already be installed where the apps run), and on
exit stop every process they started (SuperLink, SuperNodes, ``flwr run``) together with the processes those
started (SuperExec, ServerApp, ClientApps, Ray), also when a run fails.

Flower detaches the SuperExec it starts into its own session, so killing a process group is not enough: the
process tree is read from ``/proc`` (Linux) before anything is signalled, and every member is signalled by PID.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from leantrain.errors import LeantrainError

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
}


def _superlink_healthy(host: str, port: int) -> bool:
    """True when the local SuperLink answers its /health endpoint with 200 (a loopback request, no download)."""
    conn = http.client.HTTPConnection(host, port, timeout=1)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class FlowerRunError(LeantrainError):
    """A Flower process failed to start, or a run failed or timed out; the message quotes its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flwr_command(name: str) -> str:
    """The Flower CLI ``name`` next to this Python (the venv's), or on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise FlowerRunError(f"{name} not found; install Flower with: pip install -c constraints.txt 'leantrain[fl]'")
    return found


# ---------------------------------------------------------------------------------------------- process trees


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_tree(root: int) -> list[tuple[int, str | None]]:
    """``root`` and all its descendants as (pid, start time) pairs, parents first (Linux /proc; else just root)."""
    children: dict[int, list[int]] = {}
    if Path("/proc").is_dir():
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
    order, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        order.append((pid, _start_time(pid)))
        todo += children.get(pid, [])
    return order


def is_running(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` runs (and, with ``started``, is still the same process, not a reused PID)."""
    if started is not None and _start_time(pid) != started:
        return False  # gone (or the PID was reused by an unrelated process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> list[tuple[int, str | None]]:
    """SIGTERM ``proc`` and every descendant (by PID), wait ``grace_s``, then SIGKILL what is left.

    Returns the (pid, start time) pairs signalled, so callers can check that none survived (:func:`is_running`).
    """
    tree = process_tree(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, started in tree:
            if is_running(pid, started):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()
            if not any(is_running(pid, started) for pid, started in tree):
                break
            time.sleep(0.1)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    return tree


# ---------------------------------------------------------------------------------------------- deployments


class _FlowerProcesses:
    """Owns a private FLWR_HOME and the processes started under it; a context manager that stops them all."""

    connection = "leantrain-loopback"

    def __init__(self, flwr_home: str | Path | None = None, host: str = "127.0.0.1", startup_timeout_s: float = 60):
        self._own_home = flwr_home is None
        self.flwr_home = Path(flwr_home or tempfile.mkdtemp(prefix="leantrain-flwr-"))
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.host, self.startup_timeout_s = host, startup_timeout_s
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.stopped: list[tuple[int, str | None]] = []  # every (pid, start time) stop() signalled
        self.env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(self.flwr_home)}
        # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name: put ours first.
        bin_dir = str(Path(flwr_command("flwr")).parent)
        self.env["PATH"] = os.pathsep.join([bin_dir, self.env.get("PATH", "")])
        self.port: int | None = None

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.flwr_home / f"{name}.log", "wb")  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.processes.append((name, proc))
        return proc

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.flwr_home / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _start_superlink(self, extra: list[str]) -> None:
        self.port = free_port(self.host)
        proc = self._spawn("superlink", [flwr_command("flower-superlink"), "--insecure", "--host", self.host,
                                         "--port", str(self.port), "--disable-runtime-dependency-installation",
                                         *extra])  # fmt: skip
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FlowerRunError(f"flower-superlink exited with {proc.returncode}:\n{self.log_tail('superlink')}")
            if _superlink_healthy(self.host, self.port):
                break
            time.sleep(0.2)
        else:
            raise FlowerRunError(f"flower-superlink did not answer within {self.startup_timeout_s:.0f} s")
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\n'
            f'address = "{self.host}:{self.port}"\ninsecure = true\n'
        )

    def run(self, app_dir: str | Path, run_config: dict[str, Any] | None = None, timeout_s: float = 600,
            extra_args: list[str] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        """``flwr run <app_dir> <connection> --stream`` with ``run_config`` overrides; blocks until the run ends."""
        import tomli_w

        args = [flwr_command("flwr"), "run", str(app_dir), self.connection, "--stream"]
        if run_config:
            path = self.flwr_home / "run-config.toml"
            path.write_text(tomli_w.dumps(dict(run_config)))
            args += ["--run-config", str(path)]
        args += extra_args or []
        proc = self._spawn("flwr-run", args)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process_tree(proc)
            tail = self.log_tail("flwr-run")
            raise FlowerRunError(f"flwr run did not finish within {timeout_s:.0f} s:\n{tail}") from None
        output = self.log_tail("flwr-run", 20000)
        if proc.returncode != 0:
            raise FlowerRunError(f"flwr run exited with {proc.returncode}:\n{output[-3000:]}")
        return subprocess.CompletedProcess(args, proc.returncode, output, "")

    def run_app(self, app_dir: str | Path, run_config: dict[str, Any] | None = None,
                timeout_s: float = 600, extra_args: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
        """:meth:`run` a leantrain app and return the history its ServerApp wrote (``result-path``)."""
        result = self.flwr_home / f"result-{time.time_ns()}.json"
        self.run(app_dir, {**(run_config or {}), "result-path": str(result)}, timeout_s, extra_args)
        deadline = time.monotonic() + 30  # `--stream` can end a moment before the ServerApp's file is written
        while not result.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not result.exists():
            raise FlowerRunError(f"the ServerApp wrote no result to {result}:\n{self.log_tail('flwr-run')}")
        history = json.loads(result.read_text())
        if history.get("status") != "completed":
            raise FlowerRunError(f"the run did not complete ({history.get('status')}):\n{self.log_tail('flwr-run')}")
        return history

    def stop(self) -> None:
        """Stop every process started here (latest first) with its descendants; remove a temporary FLWR_HOME."""
        while self.processes:
            _, proc = self.processes.pop()
            self.stopped += stop_process_tree(proc)
        if self._own_home:
            shutil.rmtree(self.flwr_home, ignore_errors=True)

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalDeployment(_FlowerProcesses):
    """A SuperLink and ``num_supernodes`` SuperNodes on loopback; node i holds ``partition-id=i``.

    Use as a context manager: ``with LocalDeployment(2) as fl: history = fl.run_app(app_dir, {...})``.
    """

    def __init__(self, num_supernodes: int = 2, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_supernodes = num_supernodes

    def start(self) -> None:
        self._start_superlink([])
        for i in range(self.num_supernodes):
            node_config = f"partition-id={i} num-partitions={self.num_supernodes}"
            proc = self._spawn(f"supernode-{i}", [flwr_command("flower-supernode"), "--insecure", "--superlink",
                                                  f"{self.host}:{self.port}", "--host", self.host,
                                                  "--port", str(free_port(self.host)),
                                                  "--node-config", node_config])  # fmt: skip
            time.sleep(0.2)
            if proc.poll() is not None:
                tail = self.log_tail(f"supernode-{i}")
                raise FlowerRunError(f"supernode {i} exited with {proc.returncode}:\n{tail}")


class LocalSimulation(_FlowerProcesses):
    """A SuperLink in simulation mode: ``flwr run`` executes the app on Flower's Ray simulation engine.

    ``num_supernodes`` virtual nodes (partition-id 0..N-1, set by Flower), ``num_cpus`` per ClientApp and
    ``ray_cpus`` for Ray as a whole (1 and 1: one ClientApp at a time, gentle on small machines).
    """

    def __init__(self, num_supernodes: int = 2, num_cpus: float = 1, ray_cpus: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_supernodes, self.num_cpus, self.ray_cpus = num_supernodes, num_cpus, ray_cpus

    def start(self) -> None:
        self._start_superlink(["--simulation"])

    def run(self, app_dir, run_config=None, timeout_s=600, extra_args=None) -> subprocess.CompletedProcess:
        federation = (f"num-supernodes={self.num_supernodes} client-resources-num-cpus={self.num_cpus} "
                      f"init-args-num-cpus={self.ray_cpus}")  # fmt: skip
        return super().run(app_dir, run_config, timeout_s, ["--federation-config", federation, *(extra_args or [])])
