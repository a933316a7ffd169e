"""``leantrain bench federated --part workers``: rounds per second of the simulator with 1 and 2 worker processes.

The workload is compute-bound: the small CNN (conv 16-32, hidden 64) on Fashion-MNIST (mnist5k when absent),
100 clients (Dirichlet α = 0.1), 10 per round, τ = 10 local SGD steps of batch 32 (momentum 0.9), FedAvg, the
sequential engine inside every worker, one torch thread per process. Both settings run side by side in one
invocation, alternating, ``repeats`` times each; ``rounds_per_s`` is 1 / the median round time after the first
round (each process's first convolution and backward pay torch's lazy initialisation: 2.0 s against 0.6 s for
later rounds with 2 workers, 1.5 s against 1.0 s with one), medianed over repeats; ``extra`` keeps the rate with the
warm-up round too. Timed: the rounds alone (every process has built its simulator and passed a barrier first; the
spawn and data loading are left out, and so is the one evaluation at the end, done after the timer stops). The two
final global models must be bitwise equal (``identical_to_workers_1``).
"""

from __future__ import annotations

import statistics
import time

import torch

from leantrain.bench.report import Progress, discard

MODEL = {"name": "cnn", "channels": [16, 32], "hidden": 64}
WORKLOAD = {"num_clients": 100, "clients_per_round": 10, "local_steps": 10, "batch_size": 32, "lr": 0.05,
            "momentum": 0.9, "partition": "dirichlet", "alpha": 0.1, "seed": 0}  # fmt: skip
FULL = {"rounds": 20, "repeats": 3}
QUICK = {"rounds": 6, "repeats": 1}


def _simulator(spec: dict, engine):
    from leantrain.federated import Simulator, make_algorithm
    from leantrain.federated.simulator import federated_data
    from leantrain.models.build import build_model_for_data

    w = spec["workload"]
    data = federated_data(spec["dataset"], w["partition"], w["num_clients"], seed=w["seed"], alpha=w["alpha"])
    fields = {"input_shape": data.input_shape, "num_classes": data.num_classes}
    options = {k: v for k, v in MODEL.items() if k != "name"}
    return Simulator(make_algorithm("fedavg"), lambda: build_model_for_data(MODEL["name"], options, fields), data,
                     num_clients=w["num_clients"], clients_per_round=w["clients_per_round"], rounds=spec["rounds"],
                     local_steps=w["local_steps"], batch_size=w["batch_size"], lr=w["lr"], momentum=w["momentum"],
                     eval_every=spec["rounds"], seed=w["seed"], engine=engine)  # fmt: skip


def _timed_run(sim) -> tuple[float, dict[str, float]]:
    """Seconds of the rounds (evaluation left out of the timed span), then the final model's test metrics and
    this process's CPU seconds over the rounds (``cpu_s``: on a busy machine the steadier figure)."""
    from leantrain.process_group import world

    evaluate = sim.evaluate
    sim.evaluate = dict  # no evaluation while timed (rank 0 evaluates once, below)
    if world()[1] > 1:
        torch.distributed.barrier()
    started, cpu = time.perf_counter(), time.process_time()
    sim.run()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    sim.evaluate = evaluate
    return seconds, {**evaluate(), "cpu_s": cpu, "round_walls_s": [r["wall_s"] for r in sim.history.rounds]}


def _follower(rank: int, size: int, spec: dict) -> None:
    from leantrain.federated.engines.workers import WorkersEngine, follow

    sim = _simulator(spec, WorkersEngine("sequential"))
    follow(sim)
    torch.distributed.barrier()
    sim.run()


def run_once(spec: dict, workers: int) -> tuple[float, dict[str, float], dict[str, torch.Tensor], str]:
    """One timed run with ``workers`` processes: (seconds, test metrics, final global state, the engine used)."""
    from leantrain.federated.engines.workers import WorkersEngine
    from leantrain.process_group import launch

    if workers == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            sim = _simulator(spec, "sequential")
            seconds, metrics = _timed_run(sim)
        finally:
            torch.set_num_threads(threads)
        return seconds, metrics, sim.algorithm.global_state, sim.engine.describe()
    with launch(_follower, workers, args=(spec,), threads=1):
        sim = _simulator(spec, WorkersEngine("sequential"))
        seconds, metrics = _timed_run(sim)
        engine = sim.engine.describe()
        metrics["ipc_bytes_per_round"] = sim.engine.ipc_bytes / spec["rounds"]
        # the schedule's balance: the busiest rank's training seconds over the mean rank's, per round (1 = even)
        metrics["imbalance"] = statistics.median(max(ls) / (sum(ls) / len(ls)) for ls in sim.engine.loads if sum(ls))
    return seconds, metrics, sim.algorithm.global_state, engine


def workers_rows(quick: bool = False, log=print, add=discard, *, rounds: int | None = None,
                 repeats: int | None = None, dataset: str | None = None) -> list[dict]:  # fmt: skip
    """Rows ``workers-1`` and ``workers-2``: ``rounds_per_s`` (median of ``repeats``), with the final states'
    bitwise equality in ``workers-2``'s ``extra["identical_to_workers_1"]``."""
    plan = {**(QUICK if quick else FULL), **({"rounds": rounds} if rounds else {}),
            **({"repeats": repeats} if repeats else {})}  # fmt: skip
    spec = {"dataset": dataset or "fashion-mnist", "rounds": plan["rounds"], "workload": WORKLOAD}
    task = (f"{spec['dataset']} cnn-16-32, {WORKLOAD['num_clients']} clients, {WORKLOAD['clients_per_round']}/round, "
            f"tau={WORKLOAD['local_steps']}, batch {WORKLOAD['batch_size']}")  # fmt: skip
    progress = Progress("federated workers", 2 * plan["repeats"])
    seconds: dict[int, list[float]] = {1: [], 2: []}
    per_round: dict[int, list[float]] = {1: [], 2: []}  # median round time after the warm-up round, per repeat
    cpu: dict[int, list[float]] = {1: [], 2: []}
    results: dict[int, tuple] = {}
    for rep in range(plan["repeats"]):
        for workers in (1, 2):
            with progress.unit(f"{workers} worker{'s' if workers > 1 else ''}, {plan['rounds']} rounds ({rep + 1})"):
                s, metrics, state, engine = run_once(spec, workers)
            seconds[workers].append(s)
            per_round[workers].append(statistics.median(metrics["round_walls_s"][1:]))
            cpu[workers].append(metrics["cpu_s"])
            results[workers] = (metrics, state, engine)
            log(f"  workers={workers}: {1 / per_round[workers][-1]:.3f} rounds/s after the warm-up round "
                f"({s:.2f} s for all {plan['rounds']}; first round {metrics['round_walls_s'][0]:.2f} s)")  # fmt: skip
    same = all(torch.equal(results[1][1][k], results[2][1][k]) for k in results[1][1])
    rows = []
    for workers in (1, 2):
        median = statistics.median(per_round[workers])
        metrics, _, engine = results[workers]
        extra = {"workers": workers, "threads_per_worker": 1, "rounds": plan["rounds"], "repeats": plan["repeats"],
                 "seconds": seconds[workers], "round_s_after_warmup": per_round[workers],
                 "rounds_per_s_with_warmup": plan["rounds"] / statistics.median(seconds[workers]),
                 "test_accuracy": metrics.get("accuracy"), "engine": engine,
                 "cpu_s_rank0": cpu[workers], "ipc_bytes_per_round": metrics.get("ipc_bytes_per_round", 0),
                 "median_round_imbalance": metrics.get("imbalance"),
                 "workload": {**WORKLOAD, "model": MODEL}}  # fmt: skip
        if workers > 1:
            extra["identical_to_workers_1"] = same
            extra["x_workers_1"] = statistics.median(per_round[1]) / median
        rows.append({"method": f"workers-{workers}", "task": task, "rounds_per_s": 1 / median,
                     "extra": extra})  # fmt: skip
        add(rows[-1])
    log(f"  2 workers: {rows[1]['extra']['x_workers_1']:.2f}x one worker; identical final model: {same}")
    return rows
