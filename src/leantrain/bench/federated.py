"""``leantrain bench federated``: accuracy and bytes of the layer-wise algorithms, partial averaging in its paper's
setting, EmbracingFL where weak clients' data matters, cross-device speed against Flower, workers, memory.

Every accuracy row is like for like: the same data, partition, model, cohorts, rounds and local iterations for
every method, and each method's own learning rate, chosen on a validation split (seed 0, the grid ``LR_GRID``, by
the mean validation accuracy of the last 10 evaluated rounds) before its seeds run on the test split. In the
``accuracy`` part a method's rate is chosen on its Dirichlet runs and used for IID too (time: 2 cores). Rows report
the final test accuracy and the mean of the last 10 evaluated rounds (final values swing by several points with
10 clients per round), mean ± std over seeds.

Parts (``--part``):

- ``accuracy``: FedAvg, FedLAMA (φ = 2), FedLUAR (δ = 2 of the CNN's 4 kernel tensors, the paper's rule; its
  variants are measured in docs/fedluar.md) and partial averaging with sampled cohorts; Fashion-MNIST (mnist5k
  when absent), 100 clients, 10 per round, CNN conv 16-32 / hidden 64, τ = 10 local SGD steps of batch 32 with
  momentum 0.9, 50 rounds (partial averaging: 500 rounds of one step, 8 groups), Dirichlet α = 0.1.
- ``accuracy-iid``: the same with an IID partition (each method's rate searched on its own IID validation runs).
- ``partial``: partial averaging in its paper's setting (spec §3.5): 32 clients, all of them every round, digits,
  IID and Dirichlet α = 0.3, an MLP 64-128-64-32-10 (8 tensors, one per group), τ = 8, 2,000 local iterations:
  FedAvg(τ = 8, 250 rounds) against 8 groups (2,000 rounds of one step).
- ``embracing``: EmbracingFL (50% weak, 25% moderate clients; weak train the FC layers, moderate conv2 + FCs)
  against all-strong FedAvg (an upper bound) and strong-only FedAvg (the paper's baseline: weak and moderate
  clients left out), in two conditions: ``dirichlet`` (labels skewed independently of devices) and ``weak-data``
  (half the classes are held 90% by weak clients: the data strong-only FedAvg never sees).
- ``cross-device``: clients per second of our simulator (sequential and vectorised engines) and of Flower's
  simulation engine on the same cross-device workload (:mod:`leantrain.bench.federated_cross_device`).
- ``workers``: rounds per second with 1 and 2 worker processes (:mod:`leantrain.bench.federated_workers`).
- ``memory``: peak RSS of the simulator with 10 and with 1,000 clients (same cohort size), fresh processes.

``--quick``: 10 rounds (partial: 400 iterations), one seed, no learning-rate search (lr 0.05), Dirichlet only.
Targets from the issues are evaluated and printed, never tuned for.
"""

from __future__ import annotations

import importlib
import json
import os
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
from leantrain.process_memory import peak_rss_mb

PARTS = ("accuracy", "accuracy-iid", "partial", "embracing", "weak", "async", "pretrain", "cross-device", "workers",
         "memory")  # fmt: skip
LR_GRID = (0.02, 0.05, 0.1)
QUICK_LR = 0.05
MODEL = {"name": "cnn", "channels": [16, 32], "hidden": 64}
BASE = {"num_clients": 100, "clients_per_round": 10, "local_steps": 10, "batch_size": 32, "momentum": 0.9,
        "eval_every": 5}  # fmt: skip
# label -> (algorithm, options, settings that differ from BASE); fedpa runs the same local iterations as FedAvg
ACCURACY_ARMS: dict[str, tuple[str, dict, dict]] = {
    "fedavg": ("fedavg", {}, {}),
    "fedlama": ("fedlama", {"phi": 2}, {}),
    "fedluar": ("fedluar", {"recycled_layers": 2}, {}),  # the paper's rule (= the default 0.5 of 4 kernels)
    "fedpa": ("fedpa", {"groups": 8}, {"local_steps": 1, "rounds_x": 10, "eval_every": 50}),
}
PARTIAL = {"num_clients": 32, "clients_per_round": 32, "batch_size": 32, "momentum": 0.9, "iterations": 2000,
           "tau": 8}  # fmt: skip
PARTIAL_MODEL = {"name": "mlp", "hidden_sizes": [128, 64, 32]}  # 8 tensors: one whole tensor per group at tau = 8
MLP_LABEL = "mlp-64-128-64-32-10"
EMBRACING_MIX = {"weak": 0.5, "moderate": 0.25}
EMBRACING_ARMS = {
    "embracingfl": ("embracingfl", {"cuts": {"weak": 2, "moderate": 1}}, EMBRACING_MIX),
    "all-strong": ("fedavg", {}, None),
    "strong-only": ("strong-only", {}, EMBRACING_MIX),
}
WEAK_CLASSES, WEAK_SHARE = (0, 1, 2, 3, 4), 0.9


def dataset_name() -> str:
    """Fashion-MNIST if its package is installed, else the bundled mnist5k."""
    from leantrain.data import load_dataset

    try:
        load_dataset("fashion-mnist")
        return "fashion-mnist"
    except LeantrainError:
        return "mnist5k"


# ---------------------------------------------------------------------------- one run, in a fresh process


def weak_held_partition(labels: np.ndarray, device_names: list[str], classes=WEAK_CLASSES, share=WEAK_SHARE,
                        seed: int = 0) -> list[np.ndarray]:  # fmt: skip
    """Rows of ``classes`` go ``share`` to weak clients and the rest to the others; other classes to non-weak
    clients only. Within each group rows are dealt round-robin after a seeded shuffle (every client gets rows)."""
    rng = np.random.default_rng(seed)
    weak = [c for c, n in enumerate(device_names) if n == "weak"]
    other = [c for c, n in enumerate(device_names) if n != "weak"]
    if not weak or not other:
        raise ConfigError("weak_held_partition needs weak and non-weak clients")
    buckets: dict[int, list[int]] = {c: [] for c in range(len(device_names))}
    for group in (weak, other):
        rng.shuffle(group)
    cursor = {"weak": 0, "other": 0}

    def deal(rows: np.ndarray, group: list[int], key: str) -> None:
        for row in rows:
            buckets[group[cursor[key] % len(group)]].append(int(row))
            cursor[key] += 1

    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        if int(label) in classes:
            cut = int(round(share * len(rows)))
            deal(rows[:cut], weak, "weak")
            deal(rows[cut:], other, "other")
        else:
            deal(rows, other, "other")
    return [np.asarray(sorted(buckets[c]), dtype=np.int64) for c in range(len(device_names))]


def _data(spec: dict):
    from leantrain.federated.clock import assign_profiles
    from leantrain.federated.simulator import federated_data

    partition, clients = spec["partition"], spec["settings"]["num_clients"]
    eval_split = "val" if spec.get("tune") else "test"
    if partition == "weak-data":
        from leantrain.data import load_dataset

        labels = np.asarray(load_dataset(spec["dataset"], seed=spec["seed"]).train.y)
        names = assign_profiles(clients, spec.get("devices") or EMBRACING_MIX, spec["seed"])
        parts = weak_held_partition(labels, names, seed=spec["seed"])
        return federated_data(spec["dataset"], parts, clients, seed=spec["seed"], eval_split=eval_split)
    options = {"alpha": spec["alpha"]} if partition == "dirichlet" else {}
    if spec.get("unlabeled_share"):  # unlabeled rows held by the strong clients (on-device KD)
        names = assign_profiles(clients, spec.get("devices"), spec["seed"])
        options.update(unlabeled_share=spec["unlabeled_share"],
                       unlabeled_holders=[c for c, n in enumerate(names) if n == "strong"])  # fmt: skip
    return federated_data(spec["dataset"], partition, clients, seed=spec["seed"], eval_split=eval_split, **options)


def run_config(spec: dict) -> dict:
    """Run one simulation described by ``spec`` in this process; its history summary (JSON-able)."""
    from leantrain.federated import Simulator, make_algorithm
    from leantrain.models.build import build_model_for_data

    torch.set_num_threads(1)
    algorithm = bench_algorithm(spec) or make_algorithm(spec["algorithm"], **spec.get("options", {}))
    model = dict(spec.get("model", MODEL))
    name = model.pop("name")
    data = _data(spec)
    fields = {"input_shape": data.input_shape, "num_classes": data.num_classes}
    started = time.perf_counter()
    devices = spec.get("devices")
    if spec.get("device_spread"):  # one lognormal profile per client (TimelyFL's heterogeneity)
        from leantrain.federated.clock import lognormal_profiles

        devices = lognormal_profiles(spec["settings"]["num_clients"], **spec["device_spread"], seed=spec["seed"])
    sim = Simulator(algorithm, lambda: build_model_for_data(name, model, fields), data, rounds=spec["rounds"],
                    seed=spec["seed"], devices=devices, lr=spec["lr"], engine="auto",
                    **spec["settings"])  # fmt: skip
    contributions: Counter = Counter()  # accepted updates per client (participation of slow clients)
    works: list[float] = []  # each accepted reply's compute relative to full training (its ``work``)
    accumulate = algorithm.accumulate

    def counted(round_idx, cid, reply):
        contributions[cid] += 1
        works.append(float(reply.metrics.get("work", 1.0)))
        return accumulate(round_idx, cid, reply)

    algorithm.accumulate = counted
    history = sim.run()
    evaluated = [r for r in history.rounds if r.get("test_accuracy") is not None]
    result = {
        "final": history.last("test_accuracy"),
        "last10": history.window_mean("test_accuracy"),
        **history.totals,
        "wall_s": time.perf_counter() - started,
        "curve": [(r["round"], r["test_accuracy"]) for r in evaluated],
        "peak_rss_mb": peak_rss_mb(),
        "rounds_done": len(history.rounds),
        "participation": sum(r["responded"] for r in history.rounds)
        / max(sum(r["cohort"] for r in history.rounds), 1),
        "contributions": {str(c): n for c, n in sorted(contributions.items())},
        "work_mean": float(np.mean(works)) if works else None,
    }
    budget = spec["settings"].get("time_budget_s")
    if budget:  # accuracy at equal simulated wall-clock: evaluations in the last fifth of the budget
        window = [r["test_accuracy"] for r in evaluated if r["sim_time_s"] >= 0.8 * budget]
        result["time_window"] = float(np.mean(window)) if window else result["final"]
        result["time_curve"] = [(round(r["sim_time_s"], 3), r["test_accuracy"]) for r in evaluated]
    staleness = [r["staleness_mean"] for r in history.rounds if r.get("staleness_mean") is not None]
    if staleness:
        result["staleness_mean"] = float(np.mean(staleness))
    return result


def bench_algorithm(spec: dict):
    """A baseline that exists only in the benchmark: ``spec["algorithm"]`` "strong-only", or ``spec["class"]``
    ("module:Class" under leantrain.bench, built with ``spec["options"]``); None for a registered algorithm."""
    if spec["algorithm"] == "strong-only":
        return StrongOnlyFedAvg()
    if "class" in spec:
        module, _, cls = spec["class"].partition(":")
        if not module.startswith("leantrain.bench."):
            raise ConfigError(f"bench class {spec['class']!r} must live under leantrain.bench")
        return getattr(importlib.import_module(module), cls)(**spec.get("options", {}))
    return None


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


# ---------------------------------------------------------------------------- tuned rows


def _run_all(specs: list[dict], progress: Progress, workers: int = 2) -> list[dict]:
    """Run ``specs`` in fresh processes, ``workers`` at a time; results in spec order."""

    def one(spec):
        split = "validation" if spec.get("tune") else "test"
        what = f"{spec['label']} {spec['task']} lr {spec['lr']:g} seed {spec['seed']} ({split})"
        with progress.unit(what):
            result = _subprocess(spec)
        log(f"  {what}: final {result['final']:.4f}, last-10 {result['last10']:.4f}, "
            f"up {result['up_bytes'] / 1e6:.1f} MB, {result['wall_s']:.0f} s")  # fmt: skip
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, specs))


def tuned_rows(arms: list[dict], seeds: int, quick: bool, part: str, anchor: str, add=discard) -> list[dict]:
    """For each arm (a spec without lr/seed): lr chosen on validation (seed 0), then ``seeds`` seeds on test.

    One row per arm, added as soon as its seeds are in. Quick: no search, ``QUICK_LR``.
    """
    grid = (QUICK_LR,) if quick else LR_GRID
    search = len(grid) > 1
    progress = Progress(f"federated {part}", len(arms) * ((len(grid) if search else 0) + seeds))
    index = {arm["key"]: i for i, arm in enumerate(arms)}
    own = [i for i, arm in enumerate(arms) if arm.get("lr_from") not in index]  # searched on their own runs
    searched: dict[int, dict[float, float]] = {i: {} for i in own} if search else {}
    if search:
        specs = [{**arms[i], "lr": lr, "seed": 0, "tune": True} for i in own for lr in grid]
        progress.total = len(specs) + len(arms) * seeds
        for spec, result in zip(specs, _run_all(specs, progress), strict=True):
            searched[index[spec["key"]]][spec["lr"]] = result[spec.get("select", "last10")]
    # the best validation last-10 accuracy; ties go to the rate nearest the common default
    chosen = {i: max(s, key=lambda lr, s=s: (s[lr], -abs(np.log(lr / QUICK_LR)))) for i, s in searched.items()}
    for i, arm in enumerate(arms):  # an arm with lr_from takes the rate chosen for that arm (same method)
        if arm.get("lr_from") in index and index[arm["lr_from"]] in chosen:
            chosen[i] = chosen[index[arm["lr_from"]]]
            searched[i] = {**searched[index[arm["lr_from"]]], "chosen_on": arm["lr_from"]}
    specs = [{**arm, "lr": chosen.get(i, grid[0]), "seed": s} for i, arm in enumerate(arms) for s in range(seeds)]
    rows = []
    left = Counter(spec["key"] for spec in specs)
    groups: dict[str, list[dict]] = {}
    for spec, result in zip(specs, _run_all(specs, progress), strict=True):
        groups.setdefault(spec["key"], []).append(result)
        left[spec["key"]] -= 1
        if left[spec["key"]] == 0:
            i = index[spec["key"]]
            rows.append(_row(arms[i], groups[spec["key"]], spec["lr"], searched.get(i), anchor))
            add(rows[-1])
    return rows


def _row(arm: dict, runs: list[dict], lr: float, searched: dict | None, anchor: str) -> dict:
    final, final_std = mean_std([r["final"] for r in runs])
    last, last_std = mean_std([r["last10"] for r in runs])
    up, down = (statistics.fmean(r[k] for r in runs) for k in ("up_bytes", "down_bytes"))
    row = {
        "method": arm["label"], "anchor": arm["label"] == anchor, "model": arm.get("model_label", "cnn-16-32"),
        "task": arm["task"], "metric_name": "accuracy", "metric": final, "metric_std": final_std,
        "seeds": len(runs), "bytes_up": up, "bytes_down": down,
        "messages_up": statistics.fmean(r["up_messages"] for r in runs), "rounds": arm["rounds"],
        "extra": {"last10_mean": last, "last10_std": last_std, "lr": lr,
                  "lr_search_val_last10": {str(k): v for k, v in (searched or {}).items()},
                  "per_seed_final": [r["final"] for r in runs], "per_seed_last10": [r["last10"] for r in runs],
                  "up_bytes": up, "down_bytes": down,  # the earlier rows' field names, kept for scripts
                  "wall_s_median": statistics.median(r["wall_s"] for r in runs), "curve_seed0": runs[0]["curve"],
                  "options": arm.get("options", {}), "condition": arm.get("condition")},
    }  # fmt: skip
    for key in ("participation", "time_window", "staleness_mean", "rounds_done", "sim_time_s", "work_mean"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            row["extra"][key], row["extra"][f"{key}_std"] = mean_std(values)
    if "time_curve" in runs[0]:
        row["extra"]["time_curve_seed0"] = runs[0]["time_curve"]
        row["extra"]["contributions_seed0"] = runs[0]["contributions"]
    return row


def accuracy_arms(quick: bool, dataset: str, extra_arms: dict | None = None,
                  partitions: tuple[str, ...] = ("dirichlet", "iid")) -> list[dict]:  # fmt: skip
    rounds = 10 if quick else 50
    arms = []
    for partition in ("dirichlet",) if quick else partitions:
        for label, (algorithm, options, settings) in {**ACCURACY_ARMS, **(extra_arms or {})}.items():
            settings = dict(settings)
            scale = settings.pop("rounds_x", 1)
            arms.append({"key": f"{label}/{partition}", "label": label, "algorithm": algorithm, "options": options,
                         "partition": partition, "alpha": 0.1, "task": partition, "dataset": dataset,
                         "rounds": rounds * scale, "settings": {**BASE, **settings}})  # fmt: skip
            if partition == "iid" and "dirichlet" in partitions:  # one rate per method, chosen on Dirichlet
                arms[-1]["lr_from"] = f"{label}/dirichlet"
    return arms


def partial_arms(quick: bool) -> list[dict]:
    iterations = 400 if quick else PARTIAL["iterations"]
    tau = PARTIAL["tau"]
    settings = {k: PARTIAL[k] for k in ("num_clients", "clients_per_round", "batch_size", "momentum")}
    arms = []
    for partition in ("dirichlet",) if quick else ("dirichlet", "iid"):
        task = f"{partition}-full-participation"
        arms += [
            {"key": f"fedavg/{task}", "label": "fedavg", "algorithm": "fedavg", "options": {}, "partition": partition,
             "alpha": 0.3, "task": task, "dataset": "digits", "rounds": iterations // tau, "model_label": MLP_LABEL,
             "model": PARTIAL_MODEL, "settings": {**settings, "local_steps": tau, "eval_every": 5}},
            {"key": f"fedpa/{task}", "label": "fedpa", "algorithm": "fedpa", "options": {"groups": tau},
             "partition": partition, "alpha": 0.3, "task": task, "dataset": "digits", "rounds": iterations,
             "model_label": MLP_LABEL, "model": PARTIAL_MODEL,
             "settings": {**settings, "local_steps": 1, "eval_every": 5 * tau}},
        ]  # fmt: skip
    return arms


def embracing_arms(quick: bool, dataset: str) -> list[dict]:
    rounds = 10 if quick else 50
    arms = []
    for condition in ("dirichlet",) if quick else ("dirichlet", "weak-data"):
        for label, (algorithm, options, devices) in EMBRACING_ARMS.items():
            arms.append({"key": f"{label}/{condition}", "label": label, "algorithm": algorithm, "options": options,
                         "partition": condition, "alpha": 0.1, "task": condition, "condition": condition,
                         "dataset": dataset, "rounds": rounds, "devices": devices,
                         "settings": dict(BASE)})  # fmt: skip
    return arms


# ---------------------------------------------------------------------------- memory


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
    sim = Simulator(FedAvg(), lambda: build_model(name, **model), dataset_name(), "iid", rounds=3, lr=QUICK_LR,
                    **settings)  # fmt: skip
    sim.run()
    return {"peak_rss_mb": peak_rss_mb(), "num_clients": num_clients}


# ---------------------------------------------------------------------------- targets and entry point


def targets(rows: dict[str, list[dict]]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    by = {(r["method"], r["task"]): r for r in rows.get("accuracy", []) + rows.get("accuracy-iid", [])}
    for partition in ("dirichlet", "iid"):
        avg = by.get(("fedavg", partition))
        if avg is None:
            continue
        luar, lama = by.get(("fedluar", partition)), by.get(("fedlama", partition))
        last = avg["extra"]["last10_mean"]
        if luar:
            out[f"fedluar_uplink<=0.3x_fedavg_{partition}"] = luar["bytes_up"] <= 0.3 * avg["bytes_up"]
            out[f"fedluar_within_1pt_{partition}"] = luar["extra"]["last10_mean"] >= last - 0.01
        if lama:
            total = lama["bytes_up"] + lama["bytes_down"]
            out[f"fedlama_total<=0.7x_fedavg_{partition}"] = total <= 0.7 * (avg["bytes_up"] + avg["bytes_down"])
            out[f"fedlama_within_1pt_{partition}"] = lama["extra"]["last10_mean"] >= last - 0.01
    part = {(r["method"], r["task"]): r for r in rows.get("partial", [])}
    for task in {t for _, t in part}:
        if ("fedavg", task) in part and ("fedpa", task) in part:
            out[f"partial_averaging>=fedavg_{task}"] = (
                part[("fedpa", task)]["extra"]["last10_mean"] >= part[("fedavg", task)]["extra"]["last10_mean"]
            )
    emb = {(r["method"], r["task"]): r for r in rows.get("embracing", [])}
    for condition in ("dirichlet", "weak-data"):
        if all((m, condition) in emb for m in EMBRACING_ARMS):
            e, hi, lo = (emb[(m, condition)]["extra"]["last10_mean"] for m in EMBRACING_ARMS)
            out[f"embracingfl_within_2pt_of_all_strong_{condition}"] = e >= hi - 0.02
            out[f"embracingfl_above_strong_only_{condition}"] = e > lo
    for part, module in (("weak", "federated_kd"), ("weak", "federated_prism"), ("async", "federated_async"),
                         ("pretrain", "federated_pretrain")):  # fmt: skip
        if rows.get(part):
            out.update(importlib.import_module(f"leantrain.bench.{module}").targets(rows[part]))
    cross = {r["method"]: r for r in rows.get("cross-device", [])}
    if "flower" in cross:
        best = max(cross[m]["clients_per_s"] for m in ("simulator", "simulator-vmap") if m in cross)
        out["cross_device>=50x_flower"] = best >= 50 * cross["flower"]["clients_per_s"]
    if "simulator" in cross and "simulator-vmap" in cross:
        vmap, sequential = cross["simulator-vmap"]["clients_per_s"], cross["simulator"]["clients_per_s"]
        out["vmap>=5x_sequential"] = vmap >= 5 * sequential
    work = {r["method"]: r for r in rows.get("workers", [])}
    if {"workers-1", "workers-2"} <= set(work):
        out["workers_2>=1.7x_1"] = work["workers-2"]["rounds_per_s"] >= 1.7 * work["workers-1"]["rounds_per_s"]
        out["workers_identical_results"] = bool(work["workers-2"]["extra"].get("identical_to_workers_1"))
    mem = rows.get("memory", [])
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
    rows: dict[str, list[dict]] = {}
    if "accuracy" in parts:
        log(f"accuracy and bytes: {dataset}, 100 clients, 10 per round, lr per method on validation, {n_seeds} seeds")
        arms = accuracy_arms(quick, dataset, partitions=("dirichlet",))
        rows["accuracy"] = tuned_rows(arms, n_seeds, quick, "accuracy", "fedavg", results.add)
    if "accuracy-iid" in parts and not quick:
        log(f"accuracy and bytes, IID: {dataset}, 100 clients, 10 per round, lr per method on validation")
        arms = accuracy_arms(quick, dataset, partitions=("iid",))
        rows["accuracy-iid"] = tuned_rows(arms, n_seeds, quick, "accuracy-iid", "fedavg", results.add)
    if "partial" in parts:
        log("partial averaging, the paper's setting: digits, 32 clients all participating, tau = 8")
        rows["partial"] = tuned_rows(partial_arms(quick), n_seeds, quick, "partial", "fedavg", results.add)
    if "embracing" in parts:
        log("EmbracingFL: 50% weak, 25% moderate; Dirichlet 0.1 and weak clients holding half the classes")
        rows["embracing"] = tuned_rows(embracing_arms(quick, dataset), n_seeds, quick, "embracing", "all-strong",
                                       results.add)  # fmt: skip
    if "weak" in parts:
        from leantrain.bench.federated_kd import kd_arms
        from leantrain.bench.federated_prism import prism_arms

        log("weak clients: on-device KD (aux model on every client, KD on strong ones) and PriSM sub-models")
        rows["weak"] = tuned_rows(kd_arms(quick, dataset), n_seeds, quick, "weak", "kd-strong-only", results.add)
        rows["weak"] += tuned_rows(prism_arms(quick, dataset), n_seeds, quick, "weak", "prism-fedavg", results.add)
    if "async" in parts:
        from leantrain.bench.federated_async import annotate, async_arms

        log("late clients: TimelyFL against deadline FedAvg and FedBuff at equal simulated wall-clock")
        arms = async_arms(quick, dataset)
        rows["async"] = annotate(tuned_rows(arms, n_seeds, quick, "async", "timely-fedavg-deadline", results.add))
    if "pretrain" in parts:
        from leantrain.bench.federated_pretrain import pretrain_arms

        log("GPT-FL: synthetic pretraining (a shifted generator stands in for the generative model), then FedAvg")
        rows["pretrain"] = tuned_rows(pretrain_arms(quick), n_seeds, quick, "pretrain", "gptfl-scratch", results.add)
    if "cross-device" in parts:
        from leantrain.bench.federated_cross_device import cross_device_rows

        log("cross-device: clients per second, our simulator vs Flower's simulation engine")
        rows["cross-device"] = cross_device_rows(quick, log, add=results.add)
    if "workers" in parts:
        from leantrain.bench.federated_workers import workers_rows

        log("workers: rounds per second with 1 and 2 worker processes")
        rows["workers"] = workers_rows(quick, log, add=results.add, dataset=dataset)
    if "memory" in parts:
        log("memory: peak RSS with 10 and 1,000 clients")
        rows["memory"] = memory_rows(log, add=results.add)
    for part, part_rows in rows.items():
        for row in part_rows:
            row.setdefault("extra", {})["part"] = part
    met = targets(rows)
    info = {"wall_time_s": round(time.perf_counter() - started, 1), "dataset": dataset,
            "lr_grid": list((QUICK_LR,) if quick else LR_GRID)}  # fmt: skip
    path = results.finish({"targets": met, **info})
    _print_tables(rows, dataset)
    print_targets(met, path)
    if area != "federated" and not quick:
        merged = merge_into_area(Path(out_dir) / "federated.json", rows, info)
        print(f"merged these parts' rows into {merged}")
    return path


def merge_into_area(path: Path, rows: dict[str, list[dict]], info: dict) -> Path:
    """Fold the rows of the parts just run into ``federated.json`` (replacing those parts' earlier rows).

    The whole benchmark is long; running parts one at a time must still leave the one document scripts read. Its
    ``complete`` is true once every part has rows; targets are re-evaluated on the merged rows; ``runs`` records
    when and with what settings each part ran.
    """
    doc = json.loads(path.read_text()) if path.exists() else {}
    kept = [r for r in doc.get("rows", []) if r.get("extra", {}).get("part") not in rows]
    results = BenchResults("federated", path.parent, threads=1, quick=False)
    results.rows = kept
    by_part: dict[str, list[dict]] = {}
    for row in kept:
        by_part.setdefault(row["extra"]["part"], []).append(row)
    for part, part_rows in rows.items():
        results.rows += part_rows
        by_part[part] = part_rows
    runs = {**doc.get("runs", {}), **{part: info for part in rows}}
    extra = {"targets": targets(by_part), "runs": runs, "dataset": info["dataset"], "lr_grid": info["lr_grid"]}
    if set(by_part) >= set(PARTS):
        return results.finish(extra)
    for key, value in extra.items():
        results.set_extra(key, value)
    return results.path


def _print_tables(rows: dict[str, list[dict]], dataset: str) -> None:
    titles = {"accuracy": "Accuracy and bytes", "accuracy-iid": "Accuracy and bytes, IID",
              "partial": "Partial averaging, full participation", "embracing": "EmbracingFL",
              "weak": "Weak clients: on-device KD and PriSM", "pretrain": "GPT-FL: synthetic pretraining"}  # fmt: skip
    for key, title in titles.items():
        if rows.get(key):
            shown = [{**r, "last10": r["extra"]["last10_mean"], "last10_std": r["extra"]["last10_std"],
                      "lr": r["extra"]["lr"], "up_MB": r["bytes_up"] / 1e6, "down_MB": r["bytes_down"] / 1e6}
                     for r in rows[key]]  # fmt: skip
            cols = ["method", "task", "lr", "metric", "metric_std", "last10", "last10_std", "up_MB", "down_MB"]
            where = {"partial": "digits", "pretrain": "mnist1d"}.get(key, dataset)
            print(f"\n{title} ({where})\n" + markdown_table(shown, cols))
    if rows.get("async"):
        shown = [
            {
                **r,
                "time_window": r["extra"].get("time_window"),
                "participation": r["extra"].get("participation"),
                "slow_share": r["extra"].get("slow_quarter_share_seed0"),
                "lr": r["extra"]["lr"],
                "rounds_done": r["extra"].get("rounds_done"),
                "up_MB": r["bytes_up"] / 1e6,
            }
            for r in rows["async"]
        ]
        cols = ["method", "lr", "time_window", "participation", "slow_share", "rounds_done", "up_MB"]
        print("\nLate clients at equal simulated time (TimelyFL)\n" + markdown_table(shown, cols))
    if rows.get("cross-device"):
        print("\nCross-device\n" + markdown_table(rows["cross-device"], ["method", "task", "clients_per_s"]))
    if rows.get("workers"):
        print("\nWorkers\n" + markdown_table(rows["workers"], ["method", "task", "rounds_per_s"]))
    if rows.get("memory"):
        shown = [{**r, "ratio": r["extra"]["ratio_to_10_clients"]} for r in rows["memory"]]
        print("\nMemory\n" + markdown_table(shown, ["method", "peak_mem_mb", "ratio"]))


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    result = memory_probe(spec["memory_probe"]) if "memory_probe" in spec else run_config(spec)
    print(json.dumps(result))
