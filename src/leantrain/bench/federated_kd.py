"""The on-device KD rows of ``leantrain bench federated --part weak`` (project spec, federated §5.5, on
Fashion-MNIST with the official code's proportions).

Setting: 100 clients, 20 strong (``devices={"weak": 0.8}``), Dirichlet α = 0.1 over half of the training rows (the
labeled private data); the other half is split, by the same rule, among the 20 strong clients as their unlabeled rows
(the official code gives the strong clients a pool as large as all labeled data). T is the CNN conv 32-64 / hidden 128,
A the same at 0.25 width (conv 8-16 / hidden 32). Per round: 10 of 100 clients train A (phase 1) and 5 of the 20 strong
clients train T (phase 2: τ CE steps, then τ KD steps); the official code has all strong clients in every round, a
quarter of them here for CPU time (a phase-2 client costs T's 2τ steps). τ = 10, momentum 0.9, 50 rounds; the KD
ramp-up spans 3/4 of the rounds (official: 300 of 400), temperature 3, weight 0.5.

Arms (every one on the same data and cohorts, its own learning rate chosen on validation):

- ``kd``: the proposed method;
- ``kd-no-weak``: the same with weak clients excluded from phase 1 (A trained by strong clients only): what the
  weak clients' participation adds;
- ``kd-strong-only``: T trained by FedAvg on the strong clients only, 5 per round, no KD (the paper's strong
  baseline, the anchor);
- ``kd-aux-only``: A trained by FedAvg on every client, 10 per round (the paper's weak baseline; its accuracy is A's).
"""

from __future__ import annotations

ROUNDS, QUICK_ROUNDS = 50, 10
TARGET = {"name": "cnn", "channels": [32, 64], "hidden": 128}
AUX = {"name": "cnn", "channels": [8, 16], "hidden": 32}
DEVICES = {"weak": 0.8}
SETTINGS = {"num_clients": 100, "clients_per_round": 10, "local_steps": 10, "batch_size": 32, "momentum": 0.9,
            "eval_every": 5}  # fmt: skip
STRONG_PER_ROUND = 5


def kd_arms(quick: bool, dataset: str) -> list[dict]:
    rounds = QUICK_ROUNDS if quick else ROUNDS
    kd = {"strong_per_round": STRONG_PER_ROUND, "rampup_rounds": round(0.75 * rounds), "temperature": 3.0,
          "kd_weight": 0.5, "aux_model": AUX}  # fmt: skip
    arms = {
        "kd": ("kd", kd, TARGET, "cnn-32-64 (A: cnn-8-16)"),
        "kd-no-weak": ("kd", {**kd, "aux_clients": "strong"}, TARGET, "cnn-32-64 (A: cnn-8-16)"),
        "kd-strong-only": ("strong-only", {}, TARGET, "cnn-32-64"),
        "kd-aux-only": ("fedavg", {}, AUX, "cnn-8-16"),
    }
    out = []
    for label, (algorithm, options, model, model_label) in arms.items():
        settings = dict(SETTINGS)
        if label == "kd-strong-only":
            settings["clients_per_round"] = STRONG_PER_ROUND
        out.append({"key": f"{label}/dirichlet", "label": label, "algorithm": algorithm, "options": options,
                    "partition": "dirichlet", "alpha": 0.1, "task": "dirichlet-20%-strong", "dataset": dataset,
                    "rounds": rounds, "devices": DEVICES, "unlabeled_share": 0.5, "model": model,
                    "model_label": model_label, "settings": settings})  # fmt: skip
    return out


def targets(rows: list[dict]) -> dict[str, bool]:
    by = {r["method"]: r["extra"]["last10_mean"] for r in rows if r["method"].startswith("kd")}
    out = {}
    if {"kd", "kd-no-weak"} <= set(by):
        out["kd_weak_participation_raises_accuracy"] = by["kd"] > by["kd-no-weak"]
    if {"kd", "kd-strong-only"} <= set(by):
        out["kd_above_strong_only"] = by["kd"] > by["kd-strong-only"]
    if {"kd", "kd-aux-only"} <= set(by):
        out["kd_target_at_least_aux_only"] = by["kd"] >= by["kd-aux-only"]
    return out
