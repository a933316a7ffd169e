"""The TimelyFL rows of ``leantrain bench federated --part async`` (project spec, federated §6.5, on Fashion-MNIST).

Setting: 100 clients with their own lognormal compute and bandwidth factors (σ = 1 each: about a 10x spread),
each online with probability 0.8 per round, Dirichlet α = 0.5, the CNN conv 16-32 / hidden 64, τ = 10 local steps
of batch 32 with momentum 0.9 as the unit of work. Every arm runs until the same simulated wall-clock budget
(``BUDGET_S``, quick: ``QUICK_BUDGET_S``) and is compared on the mean test accuracy of its evaluations in the last
fifth of the budget (its learning rate chosen on validation by the same figure).

Arms (concurrency C = 20 sampled clients, aggregation target k = 10):

- ``timely``: TimelyFL, E_max = 2, the interval T = the 10th smallest unit time among the 20;
- ``timely-fedavg-deadline``: FedAvg with the same interval, clients slower than T dropped (the paper's
  synchronous baseline);
- ``timely-fedbuff``: FedBuff, 20 clients in flight, buffer K = 10, staleness weight 1/sqrt(1+τ), server lr 1;
- ``timely-fedavg-sync``: FedAvg waiting for all 20 (each round lasts as long as its slowest client).

Reported per arm besides accuracy: the participation rate (accepted updates / clients sampled or dispatched),
rounds done, mean staleness (FedBuff), and the share of accepted updates that came from the slowest quarter of the
clients (by unit time).
"""

from __future__ import annotations

import numpy as np

BUDGET_S, QUICK_BUDGET_S = 30.0, 15.0
MODEL = {"name": "cnn", "channels": [16, 32], "hidden": 64}
SPREAD = {"compute_sigma": 1.0, "bandwidth_sigma": 1.0}
SETTINGS = {"num_clients": 100, "clients_per_round": 20, "local_steps": 10, "batch_size": 32, "momentum": 0.9,
            "eval_every": 2, "availability": 0.8}  # fmt: skip
ARMS = {
    "timely": ("timelyfl", {"aggregation_target": 10, "max_units": 2}),
    "timely-fedavg-deadline": ("timelyfl", {"aggregation_target": 10, "adaptive": False}),
    "timely-fedbuff": ("fedbuff", {"buffer_size": 10}),
    "timely-fedavg-sync": ("fedavg", {}),
}


def async_arms(quick: bool, dataset: str) -> list[dict]:
    budget = QUICK_BUDGET_S if quick else BUDGET_S
    return [{"key": f"{label}/lognormal", "label": label, "algorithm": algorithm, "options": options,
             "partition": "dirichlet", "alpha": 0.5, "task": f"lognormal-{budget:g}s", "dataset": dataset,
             "rounds": 100_000, "device_spread": SPREAD, "model": MODEL, "model_label": "cnn-16-32",
             "select": "time_window", "settings": {**SETTINGS, "time_budget_s": budget}}
            for label, (algorithm, options) in ARMS.items()]  # fmt: skip


def unit_times(seed: int = 0) -> np.ndarray:
    """Each client's unit time t_i (τ steps of the full model plus its transfers) on the simulated clock."""
    from leantrain.federated.clock import SimulatedClock, lognormal_profiles
    from leantrain.federated.comm import message_nbytes
    from leantrain.models import build_model

    options = {k: v for k, v in MODEL.items() if k != "name"}
    model = build_model(MODEL["name"], input_shape=(1, 28, 28), num_classes=10, **options)
    nbytes = message_nbytes({k: v for k, v in model.state_dict().items() if v.is_floating_point()})
    clock = SimulatedClock()
    devices = lognormal_profiles(SETTINGS["num_clients"], **SPREAD, seed=seed)
    samples = SETTINGS["local_steps"] * SETTINGS["batch_size"]
    return np.array([clock.client_time(d, samples, 1.0, nbytes, nbytes, 2) for d in devices])


def slow_share(contributions: dict[str, int], seed: int = 0) -> float:
    """Share of accepted updates from the slowest quarter of the clients by unit time (seed ``seed``'s profiles)."""
    times = unit_times(seed)
    slow = set(np.argsort(times)[-len(times) // 4 :].tolist())
    total = sum(contributions.values())
    return sum(n for c, n in contributions.items() if int(c) in slow) / total if total else 0.0


def annotate(rows: list[dict]) -> list[dict]:
    """Add each row's share of accepted updates from the slowest quarter of the clients (seed 0)."""
    for row in rows:
        row["extra"]["slow_quarter_share_seed0"] = slow_share(row["extra"].get("contributions_seed0", {}))
    return rows


def targets(rows: list[dict]) -> dict[str, bool]:
    by = {r["method"]: r for r in rows if r["method"].startswith("timely")}
    out = {}
    if "timely" not in by:
        return out
    acc = by["timely"]["extra"].get("time_window")
    for base in ("timely-fedavg-deadline", "timely-fedbuff"):
        if base in by:
            out[f"timely_above_{base[7:]}_at_equal_time"] = acc > by[base]["extra"].get("time_window")
            out[f"timely_more_participation_than_{base[7:]}"] = (
                by["timely"]["extra"]["participation"] > by[base]["extra"]["participation"]
            )
            out[f"timely_more_slow_client_updates_than_{base[7:]}"] = (
                by["timely"]["extra"]["slow_quarter_share_seed0"] > by[base]["extra"]["slow_quarter_share_seed0"]
            )
    return out
