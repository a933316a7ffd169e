"""``leantrain bench federated``: FedAvg, FedLAMA, FedLUAR and partial averaging; EmbracingFL; simulator speed.

Setting (one for every algorithm): Fashion-MNIST (mnist5k when the Fashion-MNIST package is absent), 100 clients,
10 sampled per round, a small CNN (conv 16-32, hidden 64, 106k parameters), τ = 10 local SGD steps of batch 32 at
lr 0.05 with momentum 0.9 (a fresh optimizer per client and round), 50 rounds (``--quick``: 10 rounds, 1 seed,
Dirichlet only), Dirichlet α = 0.1 and IID partitions, seeds 0..2. Partial averaging runs the same number of local
iterations: 500 rounds of one step, with τ = 8 groups (whole tensors; the CNN has 8, so it averages slightly more
often than FedAvg's τ = 10 and sends about 25% more bytes). Algorithm options are the papers' defaults scaled to
this CNN (FedLUAR δ = 2 of its 4 kernel tensors, the spec's FEMNIST-CNN value, and δ = 1 as a sensitivity row;
FedLAMA φ = 2).

Parts (``--part``):

- ``accuracy``: final test accuracy (mean ± std over seeds) and total bytes up and down per algorithm and
  partition, each run in a fresh process, two at a time.
- ``embracing``: EmbracingFL with 50% weak and 25% moderate clients against all-strong FedAvg and strong-only
  FedAvg (weak and moderate clients excluded), Dirichlet α = 0.1. Cuts as the spec gives them for the FEMNIST CNN
  (weak clients train the two FC layers, moderate conv2 and the FCs): the memory estimate would leave this small
  CNN's weak and moderate clients only the output layer, over budget (docs/embracingfl.md).
- ``throughput``: seconds per round of the 100-client FedAvg workload in our simulator, the same local training
  run as a bare loop (the raw compute), and Flower's simulation engine when flwr is installed.
- ``memory``: peak RSS of the simulator with 10 and with 1,000 clients (same cohort size), fresh processes.

Targets from the issue are evaluated and printed, never tuned for.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from leantrain.bench.report import BenchResults, Progress, discard, log, markdown_table, mean_std, print_targets
from leantrain.errors import ConfigError, LeantrainError
from leantrain.federated.algorithms.fedavg import FedAvg

PARTS = ("accuracy", "embracing", "throughput", "memory")
ALGORITHMS = {
    "fedavg": {},
    "fedlama": {"phi": 2},
    "fedluar": {"recycled_layers": 2},
    "fedluar-d1": {"recycled_layers": 1},
    "fedpa": {"groups": 8},  # whole tensors: the CNN has 8, so tau = 8 groups at most
}
MODEL = {"name": "cnn", "channels": [16, 32], "hidden": 64}
BASE = {"num_clients": 100, "clients_per_round": 10, "local_steps": 10, "batch_size": 32, "lr": 0.05,
        "momentum": 0.9, "eval_every": 5}  # fmt: skip


def dataset_name() -> str:
    """Fashion-MNIST if its package is installed, else the bundled mnist5k."""
    from leantrain.data import load_dataset

    try:
        load_dataset("fashion-mnist")
        return "fashion-mnist"
    except LeantrainError:
        return "mnist5k"


def run_config(spec: dict) -> dict:
    """Run one simulation described by ``spec`` in this process; its history summary (JSON-able)."""
    from leantrain.federated import Simulator, make_algorithm
    from leantrain.models import build_model

    torch.set_num_threads(1)
    algorithm = (StrongOnlyFedAvg() if spec["algorithm"] == "strong-only"
                 else make_algorithm(spec["algorithm"], **spec.get("options", {})))  # fmt: skip
    model = dict(MODEL)
    name = model.pop("name")
    settings = {**BASE, **spec.get("settings", {})}
    partition = spec["partition"]
    options = {"alpha": 0.1} if partition == "dirichlet" else {}
    started = time.perf_counter()
    sim = Simulator(algorithm, lambda: build_model(name, **model), spec["dataset"], partition,
                    rounds=spec["rounds"], seed=spec["seed"], partition_options=options,
                    devices=spec.get("devices"), **settings)  # fmt: skip
    history = sim.run()
    return {
        "final_test_accuracy": history.last("test_accuracy"),
        **history.totals,
        "wall_s": time.perf_counter() - started,
        "curve": [(r["round"], r["test_accuracy"]) for r in history.rounds if r.get("test_accuracy") is not None],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


class StrongOnlyFedAvg(FedAvg):
    """FedAvg that never samples weak or moderate clients (the EmbracingFL paper's "strong-only" baseline)."""

    name = "strong-only"

    def sample(self, round_idx, k, rng, available):
        strong = [c for c in available if self.devices[c].name == "strong"]
        return super().sample(round_idx, k, rng, strong)


def _subprocess(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "leantrain.bench.federated", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise LeantrainError(f"bench federated run {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spec_rows(specs: list[dict], anchor: str, part: str, log, add=discard, workers: int = 2) -> list[dict]:
    """Run ``specs`` in fresh processes, ``workers`` at a time; one row per (label, partition) over the seeds.

    Results are taken in spec order, and a row is passed to ``add`` as soon as its last seed's run is in.
    """
    progress = Progress(f"federated {part}", len(specs))

    def one(spec):
        with progress.unit(f"{spec['label']} {spec['partition']} seed {spec['seed']}"):
            result = _subprocess(spec)
            log(f"  {spec['label']:<12} {spec['partition']:<9} seed {spec['seed']}: accuracy "
                f"{result['final_test_accuracy']:.4f}, up {result['up_bytes'] / 1e6:.1f} MB, "
                f"down {result['down_bytes'] / 1e6:.1f} MB, {result['wall_s']:.0f} s")  # fmt: skip
        return result

    left = Counter((spec["label"], spec["partition"]) for spec in specs)
    groups: dict[tuple[str, str], list[dict]] = {}
    rows = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for spec, result in zip(specs, pool.map(one, specs), strict=True):
            key = (spec["label"], spec["partition"])
            groups.setdefault(key, []).append(result)
            left[key] -= 1
            if left[key] == 0:
                rows.append(_row(*key, groups[key], anchor))
                add(rows[-1])
    return rows


def _row(label: str, partition: str, runs: list[dict], anchor: str) -> dict:
    mean, std = mean_std([r["final_test_accuracy"] for r in runs])
    return {
        "method": label, "anchor": label == anchor, "model": "cnn-16-32", "task": f"{partition}",
        "metric_name": "accuracy", "metric": mean, "metric_std": std, "seeds": len(runs),
        "extra": {"up_bytes": statistics.mean(r["up_bytes"] for r in runs),
                  "down_bytes": statistics.mean(r["down_bytes"] for r in runs),
                  "up_messages": statistics.mean(r["up_messages"] for r in runs),
                  "per_seed": [r["final_test_accuracy"] for r in runs],
                  "wall_s_median": statistics.median(r["wall_s"] for r in runs),
                  "curve_seed0": runs[0]["curve"]},
    }  # fmt: skip


def accuracy_specs(seeds: int, quick: bool, dataset: str) -> list[dict]:
    rounds = 10 if quick else 50
    partitions = ("dirichlet",) if quick else ("dirichlet", "iid")
    specs = []
    for seed in range(seeds):
        for partition in partitions:
            for name, options in ALGORITHMS.items():
                spec = {"algorithm": name.split("-")[0], "label": name, "options": options, "partition": partition,
                        "seed": seed, "dataset": dataset, "rounds": rounds}  # fmt: skip
                if name == "fedpa":  # the same local iterations: τ rounds of one step per FedAvg round
                    tau = BASE["local_steps"]
                    spec.update(rounds=rounds * tau, settings={"local_steps": 1, "eval_every": 5 * tau})
                specs.append(spec)
    return specs


def embracing_specs(seeds: int, quick: bool, dataset: str) -> list[dict]:
    rounds = 10 if quick else 50
    mix = {"weak": 0.5, "moderate": 0.25}
    cuts = {"weak": 2, "moderate": 1}  # the spec's FEMNIST-CNN split: weak train the FCs, moderate conv2 + FCs
    arms = [("embracingfl", "embracingfl", mix, {"cuts": cuts}), ("all-strong", "fedavg", None, {}),
            ("strong-only", "strong-only", mix, {})]  # fmt: skip
    return [
        {"algorithm": algo, "label": label, "options": options, "partition": "dirichlet", "seed": seed,
         "dataset": dataset, "rounds": rounds, "devices": devices}
        for seed in range(seeds) for label, algo, devices, options in arms
    ]  # fmt: skip


# ---------------------------------------------------------------------------- throughput and memory


def throughput_rows(rounds: int, log, add=discard) -> list[dict]:
    """Seconds per round: our simulator vs the same local training as a bare loop, and vs Flower when installed.

    Medians over rounds after one warm-up round (torch's lazy initialisation lands in the first optimizer step).
    The simulator evaluates the global model every round, as the Flower strategy does; its training-only round
    time is the round's wall time minus one timed evaluation, and its overhead is that over the raw loop.
    """
    torch.set_num_threads(1)
    progress = Progress("federated throughput", 3)
    with progress.unit(f"leantrain simulator, {1 + rounds} rounds"):
        sim, with_eval, eval_s = _simulator_round_time(rounds)
    sim_s = with_eval - eval_s
    with progress.unit(f"raw local training, {1 + rounds} rounds"):
        raw_s = _raw_round_time(sim, rounds)
    log(f"  simulator {with_eval:.3f} s/round with evaluation ({eval_s:.3f} s of it), {sim_s:.3f} s without; "
        f"raw local training {raw_s:.3f} s/round")  # fmt: skip
    rows = [
        {"method": "leantrain-simulator", "anchor": True, "task": "fedavg-100-clients",
         "step_time_s_median": sim_s, "extra": {"overhead_over_raw": sim_s / raw_s - 1, "rounds": rounds}},
        {"method": "leantrain-simulator-eval-every-round", "anchor": False, "task": "fedavg-100-clients",
         "step_time_s_median": with_eval, "extra": {"rounds": rounds, "eval_s": eval_s}},
        {"method": "raw-local-training", "anchor": False, "task": "fedavg-100-clients",
         "step_time_s_median": raw_s, "extra": {"rounds": rounds}},
    ]  # fmt: skip
    for row in rows:
        add(row)
    with progress.unit(f"flower simulation, 1 and {1 + rounds} rounds"):
        flower = flower_round_time(rounds, log)
    if flower is not None:
        rows.append({"method": "flower-simulation", "anchor": False, "task": "fedavg-100-clients",
                     "step_time_s_median": flower, "extra": {"rounds": rounds}})  # fmt: skip
        add(rows[-1])
    return rows


def _simulator_round_time(rounds: int):
    """(simulator, median seconds per round with evaluation, seconds of one evaluation) over 1 + ``rounds``."""
    from leantrain.federated import Simulator
    from leantrain.models import build_model

    model = dict(MODEL)
    name = model.pop("name")
    sim = Simulator(FedAvg(), lambda: build_model(name, **model), dataset_name(), "dirichlet", rounds=1 + rounds,
                    partition_options={"alpha": 0.1}, **{**BASE, "eval_every": 1})  # fmt: skip
    history = sim.run()
    with_eval = statistics.median(r["wall_s"] for r in history.rounds[1:])
    start = time.perf_counter()
    sim.evaluate()
    return sim, with_eval, time.perf_counter() - start


def _raw_round_time(sim, rounds: int) -> float:
    """The raw compute: median seconds per round of ``sim``'s clients, batches and local steps, nothing else.

    No ledger, checks, aggregation or evaluation.
    """
    from leantrain.federated.algorithms.base import communicated, load_arrays
    from leantrain.federated.client import local_sgd
    from leantrain.federated.simulator import seed_for
    from leantrain.models import build_model

    model = dict(MODEL)
    name = model.pop("name")
    raw = build_model(name, **model)
    state = communicated(sim.algorithm.global_state)
    raw_times = []
    for r in range(1 + rounds):
        start = time.perf_counter()
        rng = np.random.default_rng(seed_for(sim.seed, r))
        for cid in sim.algorithm.sample(r, sim.clients_per_round, rng, list(range(sim.num_clients))):
            load_arrays(raw, state)
            batches = sim.client_data.batches(cid, BASE["batch_size"], seed_for(sim.seed, r, cid))
            local_sgd(raw, sim.loss_fn, batches, BASE["local_steps"], BASE["lr"], BASE["momentum"])
        raw_times.append(time.perf_counter() - start)
    return statistics.median(raw_times[1:])


def flower_round_time(rounds: int, log) -> float | None:
    """Seconds per round of the same FedAvg workload on Flower's simulation engine (None without flwr).

    100 virtual SuperNodes, one ClientApp at a time on one CPU (as our simulator), server-side evaluation every
    round. The per-round time is the difference between a (1 + rounds)-round and a 1-round ``flwr run``, so Ray's
    and the apps' start-up cost cancels out.
    """
    import tempfile

    from leantrain.errors import MissingDependencyError

    try:
        from leantrain.federated.flower import LocalSimulation, write_app
    except (ImportError, MissingDependencyError):
        log("  flwr is not installed: no Flower throughput row")
        return None
    model = dict(MODEL)
    name = model.pop("name")
    walls = {}
    for n in (1, 1 + rounds):
        with tempfile.TemporaryDirectory() as tmp:
            app = write_app(Path(tmp) / "app", algorithm="fedavg", model=name, model_options=model,
                            dataset=dataset_name(), partition="dirichlet", partition_options={"alpha": 0.1},
                            num_clients=BASE["num_clients"], clients_per_round=BASE["clients_per_round"], rounds=n,
                            local_steps=BASE["local_steps"], batch_size=BASE["batch_size"], lr=BASE["lr"],
                            momentum=BASE["momentum"], torch_threads=1)  # fmt: skip
            with LocalSimulation(BASE["num_clients"], flwr_home=Path(tmp) / "flwr-home") as flower:
                start = time.perf_counter()
                flower.run_app(app, timeout_s=1800)
                walls[n] = time.perf_counter() - start
        log(f"  flower simulation, {n} round(s): {walls[n]:.1f} s")
    return (walls[1 + rounds] - walls[1]) / rounds


def memory_rows(log, add=discard) -> list[dict]:
    """Peak RSS of the simulator with 10 and with 1,000 clients, each in a fresh process; ratios to 10 clients."""
    progress = Progress("federated memory", 2)
    rows = []
    for n in (10, 1000):
        with progress.unit(f"{n} clients"):
            res = _subprocess({"memory_probe": n})
            log(f"  {n} clients: peak RSS {res['peak_rss_mb']:.0f} MB")
        res["ratio_to_10_clients"] = res["peak_rss_mb"] / (rows[0]["peak_mem_mb"] if rows else res["peak_rss_mb"])
        rows.append({"method": f"simulator-{n}-clients", "anchor": n == 10, "task": "peak-rss",
                     "peak_mem_mb": res["peak_rss_mb"], "extra": res})  # fmt: skip
        add(rows[-1])
    return rows


def memory_probe(num_clients: int) -> dict:
    """Peak RSS of 3 FedAvg rounds over ``num_clients`` clients (10 per round) in this process."""
    from leantrain.federated import Simulator
    from leantrain.models import build_model

    torch.set_num_threads(1)
    model = dict(MODEL)
    name = model.pop("name")
    settings = {**BASE, "num_clients": num_clients, "eval_every": 3}
    sim = Simulator(FedAvg(), lambda: build_model(name, **model), dataset_name(), "iid", rounds=3, **settings)
    sim.run()
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "num_clients": num_clients}


# ---------------------------------------------------------------------------- targets and entry point


def targets(acc: list[dict], emb: list[dict], thr: list[dict], mem: list[dict]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    by = {(r["method"], r["task"]): r for r in acc}
    for partition in ("dirichlet", "iid"):
        avg = by.get(("fedavg", partition))
        if avg is None:
            continue
        luar, lama = by.get(("fedluar", partition)), by.get(("fedlama", partition))
        if luar:
            out[f"fedluar_uplink<=0.3x_fedavg_{partition}"] = (
                luar["extra"]["up_bytes"] <= 0.3 * avg["extra"]["up_bytes"]
            )
            out[f"fedluar_within_1pt_{partition}"] = luar["metric"] >= avg["metric"] - 0.01
        if lama:
            total = lama["extra"]["up_bytes"] + lama["extra"]["down_bytes"]
            out[f"fedlama_total<=0.7x_fedavg_{partition}"] = total <= 0.7 * (
                avg["extra"]["up_bytes"] + avg["extra"]["down_bytes"]
            )
            out[f"fedlama_within_1pt_{partition}"] = lama["metric"] >= avg["metric"] - 0.01
    e = {r["method"]: r for r in emb}
    if {"embracingfl", "all-strong", "strong-only"} <= set(e):
        out["embracingfl_within_2pt_of_all_strong"] = e["embracingfl"]["metric"] >= e["all-strong"]["metric"] - 0.02
        out["embracingfl_above_strong_only"] = e["embracingfl"]["metric"] > e["strong-only"]["metric"]
    t = {r["method"]: r for r in thr}
    if "leantrain-simulator" in t:
        out["simulator_overhead<=10pct"] = t["leantrain-simulator"]["extra"]["overhead_over_raw"] <= 0.10
        if "flower-simulation" in t:
            ours = t["leantrain-simulator-eval-every-round"]["step_time_s_median"]
            ratio = t["flower-simulation"]["step_time_s_median"] / ours
            out["simulator>=20x_flower_throughput"] = ratio >= 20
    if len(mem) == 2:
        out["1000_clients_peak_mem<=1.5x_10"] = mem[1]["extra"]["ratio_to_10_clients"] <= 1.5
    return out


def run_bench(quick: bool, out_dir: Path, seeds: int | None = None, parts: tuple[str, ...] = PARTS) -> Path:
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ConfigError(f"bench federated: unknown part(s) {unknown}; choose from {list(PARTS)}")
    started = time.perf_counter()
    area = "federated" if set(parts) == set(PARTS) else "federated-" + "-".join(p for p in PARTS if p in parts)
    results = BenchResults(area, out_dir, threads=1, quick=quick)
    dataset = dataset_name()
    n_seeds = seeds or (1 if quick else 3)
    acc, emb, thr, mem = [], [], [], []
    if "accuracy" in parts:
        log(f"accuracy and bytes: {dataset}, 100 clients, 10 per round, seeds {n_seeds}, two runs at a time")
        acc = spec_rows(accuracy_specs(n_seeds, quick, dataset), "fedavg", "accuracy", log, add=results.add)
    if "embracing" in parts:
        log("EmbracingFL: 50% weak, 25% moderate vs all-strong and strong-only, Dirichlet 0.1")
        emb = spec_rows(embracing_specs(n_seeds, quick, dataset), "all-strong", "embracing", log, add=results.add)
    if "throughput" in parts:
        log("throughput: 100-client FedAvg, seconds per round")
        thr = throughput_rows(3 if quick else 5, log, add=results.add)
    if "memory" in parts:
        log("memory: peak RSS with 10 and 1,000 clients")
        mem = memory_rows(log, add=results.add)
    met = targets(acc, emb, thr, mem)
    path = results.finish({"targets": met, "wall_time_s": round(time.perf_counter() - started, 1), "dataset": dataset})
    for title, rows in (("Accuracy and bytes", acc), ("EmbracingFL", emb)):
        if rows:
            for r in rows:
                r.update(up_MB=r["extra"]["up_bytes"] / 1e6, down_MB=r["extra"]["down_bytes"] / 1e6)
            cols = ["method", "task", "metric", "metric_std", "seeds", "up_MB", "down_MB"]
            print(f"\n{title} ({dataset})\n" + markdown_table(rows, cols))
    if thr:
        for r in thr:
            r["overhead"] = r["extra"].get("overhead_over_raw")
        print("\nThroughput (s per round)\n" + markdown_table(thr, ["method", "step_time_s_median", "overhead"]))
    if mem:
        for r in mem:
            r["ratio"] = r["extra"]["ratio_to_10_clients"]
        print("\nMemory\n" + markdown_table(mem, ["method", "peak_mem_mb", "ratio"]))
    print_targets(met, path)
    return path


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    result = memory_probe(spec["memory_probe"]) if "memory_probe" in spec else run_config(spec)
    print(json.dumps(result))
