"""Cross-device speed: many small clients, little work each, where a runtime's per-client overhead decides.

One workload for every runtime (``WORKLOAD``): sklearn's digits split IID over 1,000 clients (1-2 images each,
as many phone-sized clients hold), 100 sampled per round, an MLP 64-32-10, 5 local SGD steps each, server-side
evaluation after every round (as Flower's strategy evaluates). Rows:

- ``simulator``: our simulator, clients trained one after another (``engine="sequential"``);
- ``simulator-vmap``: the same rounds with the vectorised cohort engine (``engine="vmap"``; same results);
- ``flower``: Flower's simulation engine (Ray; one virtual SuperNode per client, ClientApps on the machine's
  cores), the same algorithm, data, model and cohorts through leantrain's Flower app.

``clients_per_s`` = clients per round / seconds per round. Ours: the median round wall time after one warm-up
round, one torch thread. Flower: the median of the round times its ServerApp measured (from sending a round's
instructions to the end of its evaluation) after the first round, so the start-up of the SuperLink, Ray and the
apps is left out; its ClientApps use one torch thread each and as many run at once as Flower's default backend
allows on this machine (both cores), so Flower gets the whole machine while ours runs in one process on one core.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from leantrain.bench.report import Progress, discard

WORKLOAD = {"dataset": "digits", "num_clients": 1000, "clients_per_round": 100, "local_steps": 5,
            "batch_size": 16, "lr": 0.05, "model": "mlp", "model_options": {"hidden_sizes": [32]}}  # fmt: skip
QUICK = {"ours_rounds": 3, "flower_rounds": 2}
FULL = {"ours_rounds": 10, "flower_rounds": 3}


def _task(w: dict) -> str:
    hidden = "-".join(str(h) for h in w["model_options"]["hidden_sizes"])
    return (f"{w['dataset']}-mlp-{hidden}-{w['num_clients']}-clients-{w['clients_per_round']}-per-round-"
            f"{w['local_steps']}-steps")  # fmt: skip


def simulator_round_times(engine: str, rounds: int, w: dict) -> tuple[list[float], str, dict]:
    """Wall seconds of 1 + ``rounds`` rounds of ``w`` in our simulator with ``engine`` (one thread); the engine's
    description and the final global state (to compare engines)."""
    from leantrain.federated import FedAvg, Simulator
    from leantrain.federated.simulator import federated_data
    from leantrain.models.build import build_model_for_data

    torch.set_num_threads(1)
    data = federated_data(w["dataset"], "iid", w["num_clients"])
    fields = {"input_shape": data.input_shape, "num_classes": data.num_classes}
    sim = Simulator(FedAvg(), lambda: build_model_for_data(w["model"], w["model_options"], fields), data,
                    num_clients=w["num_clients"], clients_per_round=w["clients_per_round"], rounds=1 + rounds,
                    local_steps=w["local_steps"], batch_size=w["batch_size"], lr=w["lr"], eval_every=1,
                    engine=engine)  # fmt: skip
    history = sim.run()
    return [r["wall_s"] for r in history.rounds], history.rounds[-1].get("engine", engine), sim.algorithm.global_state


def flower_round_times(rounds: int, w: dict, log) -> list[float] | None:
    """Wall seconds of each of 1 + ``rounds`` rounds of ``w`` on Flower's simulation engine, as its ServerApp
    measured them (from sending a round's instructions to the end of its evaluation); None without flwr."""
    from leantrain.errors import MissingDependencyError

    try:
        from leantrain.federated.flower import LocalSimulation, write_app
    except (ImportError, MissingDependencyError):
        log("  flwr is not installed: no Flower row")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        app = write_app(Path(tmp) / "app", algorithm="fedavg", model=w["model"], model_options=w["model_options"],
                        dataset=w["dataset"], partition="iid", num_clients=w["num_clients"],
                        clients_per_round=w["clients_per_round"], rounds=1 + rounds, local_steps=w["local_steps"],
                        batch_size=w["batch_size"], lr=w["lr"], torch_threads=1)  # fmt: skip
        with LocalSimulation(w["num_clients"], flwr_home=Path(tmp) / "flwr-home") as flower:
            start = time.perf_counter()
            history = flower.run_app(app, timeout_s=3600)
            total = time.perf_counter() - start
    walls = [float(row["wall_s"]) for row in history["rounds"]]
    log(f"  flower simulation engine: {1 + rounds} rounds in {total:.1f} s with start-up; rounds "
        + ", ".join(f"{x:.1f} s" for x in walls))  # fmt: skip
    return walls


def cross_device_rows(quick: bool, log, add=discard) -> list[dict]:
    """The three rows (``simulator``, ``simulator-vmap``, ``flower``) with ``clients_per_s``."""
    plan = QUICK if quick else FULL
    w = dict(WORKLOAD)
    task = _task(w)
    progress = Progress("federated cross-device", 3)
    rows, states = [], {}
    for method, engine in (("simulator", "sequential"), ("simulator-vmap", "vmap")):
        with progress.unit(f"{method}, {1 + plan['ours_rounds']} rounds"):
            walls, used, states[method] = simulator_round_times(engine, plan["ours_rounds"], w)
        per_round = statistics.median(walls[1:])
        log(f"  {method}: {per_round:.3f} s per round ({used})")
        rows.append({"method": method, "anchor": method == "simulator", "model": "mlp", "task": task,
                     "step_time_s_median": per_round, "clients_per_s": w["clients_per_round"] / per_round,
                     "rounds": plan["ours_rounds"],
                     "extra": {"engine": used, "round_walls_s": walls, "workload": w}})  # fmt: skip
        add(rows[-1])
    same = max(float((states["simulator"][k] - v).abs().max()) for k, v in states["simulator-vmap"].items())
    rows[1]["extra"]["max_abs_diff_to_sequential"] = same
    with progress.unit(f"flower simulation engine, 1 and {1 + plan['flower_rounds']} rounds"):
        walls = flower_round_times(plan["flower_rounds"], w, log)
    if walls is not None:
        per_round = statistics.median(walls[1:])
        rows.append({"method": "flower", "anchor": False, "model": "mlp", "task": task,
                     "step_time_s_median": per_round, "clients_per_s": w["clients_per_round"] / per_round,
                     "rounds": plan["flower_rounds"],
                     "extra": {"seconds_per_client_call": per_round / w["clients_per_round"], "round_walls_s": walls,
                               "workload": w}})  # fmt: skip
        add(rows[-1])
        for row in rows[:2]:
            row["extra"]["x_flower"] = row["clients_per_s"] / rows[-1]["clients_per_s"]
    if len(rows) > 1:
        rows[1]["extra"]["x_sequential"] = rows[1]["clients_per_s"] / rows[0]["clients_per_s"]
    return rows
