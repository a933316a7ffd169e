"""The PriSM rows of ``leantrain bench federated --part weak`` (project spec, federated §8.6, on Fashion-MNIST).

Setting: 100 clients, 10 per round, Dirichlet α = 1 (the spec's CPU plan), τ = 10 local SGD steps of batch 32 with
momentum 0.9, 50 rounds (quick: 10), the CNN conv 32-64 / hidden 128, every arm with the same data, cohorts, rounds
and local iterations and its own learning rate chosen on validation. Decomposed: conv2 (32 -> 64, 3×3, r = 64, the
paper's rule) and the hidden FC layer (3136 -> 128, r = 128). The paper decomposes every conv of a conv-dominated
network (ResNet-18); this CNN's parameters sit in its hidden FC layer (401k of 422k), so a sub-model that leaves it
dense would train and send almost the full model. The output layer and the input conv stay dense.

Arms (keep = 0.25 of the kernels of each decomposed layer per client and round, spec §8.6; the paper's 0.2 is the
algorithm's default):

- ``prism-fedavg``: full-model FedAvg (the anchor; an upper bound no weak client could run);
- ``prism``: PriSM, p_j ∝ s_j (γ = 1);
- ``prism-uniform``: PriSM with uniform sampling (γ = 0);
- ``prism-channels``: the same layers, each client training a random 25% of their original output channels (the
  paper's width-reduction / random-subset baseline, FedDropout/HeteroFL-like).

Targets (reported, never tuned for): PriSM within 2 points of FedAvg (the paper's ~2% drop at 0.2x), PriSM ≥ uniform
> channels (spec §8.6), and PriSM's uplink at most half of FedAvg's (expected about 0.27x here: the kept slices
16·(288 + 64) and 32·(3136 + 128) replace 18,432 and 401,408 weights).
"""

from __future__ import annotations

ROUNDS, QUICK_ROUNDS = 50, 10
MODEL = {"name": "cnn", "channels": [32, 64], "hidden": 128}
MODEL_LABEL = "cnn-32-64"
SETTINGS = {"num_clients": 100, "clients_per_round": 10, "local_steps": 10, "batch_size": 32, "momentum": 0.9,
            "eval_every": 5}  # fmt: skip
KEEP = 0.25
LAYERS = ["features.3", "classifier.1"]  # conv2 and the hidden FC layer of leantrain's "cnn"
WITHIN = 0.02


def prism_arms(quick: bool, dataset: str) -> list[dict]:
    rounds = QUICK_ROUNDS if quick else ROUNDS
    prism = {"keep": KEEP, "layers": LAYERS}
    arms = {
        "prism-fedavg": ("fedavg", {}),
        "prism": ("prism", {**prism, "gamma": 1.0}),
        "prism-uniform": ("prism", {**prism, "gamma": 0.0}),
        "prism-channels": ("prism", {**prism, "basis": "channels"}),
    }
    return [{"key": f"{label}/dirichlet", "label": label, "algorithm": algorithm, "options": options,
             "partition": "dirichlet", "alpha": 1.0, "task": "dirichlet-1", "dataset": dataset, "rounds": rounds,
             "model": MODEL, "model_label": MODEL_LABEL, "settings": dict(SETTINGS)}
            for label, (algorithm, options) in arms.items()]  # fmt: skip


def targets(rows: list[dict]) -> dict[str, bool]:
    """PriSM's targets from the ``weak`` part's rows (rows of other methods are ignored)."""
    by = {r["method"]: r for r in rows if r["method"].startswith("prism")}
    acc = {m: r["extra"]["last10_mean"] for m, r in by.items()}
    out = {}
    if {"prism", "prism-fedavg"} <= set(by):
        out[f"prism_within_{round(WITHIN * 100)}pt_of_fedavg"] = acc["prism"] >= acc["prism-fedavg"] - WITHIN
        out["prism_uplink<=0.5x_fedavg"] = by["prism"]["bytes_up"] <= 0.5 * by["prism-fedavg"]["bytes_up"]
    if {"prism", "prism-uniform", "prism-channels"} <= set(by):
        out["prism>=uniform>channels"] = acc["prism"] >= acc["prism-uniform"] > acc["prism-channels"]
    return out
