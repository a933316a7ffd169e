"""Benchmark arms for GPT-FL (arXiv 2306.02210): synthetic pretraining, then FedAvg, against FedAvg from scratch and
the synthetic-pretrained model alone. ``leantrain bench federated --part pretrain`` runs them through
:func:`leantrain.bench.federated.tuned_rows` (FL learning rate chosen per arm on validation rows).

Setting: MNIST-1D (3,600 training rows after the validation cut) over 40 clients, Dirichlet 0.1, 10 sampled per
round, τ = 10 local steps of batch 32 with momentum 0.9, 60 rounds (quick: 10), an MLP 40-128-128-10. Every arm
gets the same budget. The synthetic data is the offline stand-in ``mnist1d-synthetic`` (the MNIST-1D generator with
less noise and shear and another seed, 3x the real training size), not the output of a generative model; see
:mod:`leantrain.federated.algorithms.gptfl`.

Arms:

- ``gptfl-scratch``: FedAvg from random initialisation (the anchor);
- ``gptfl-synthetic-only``: the synthetic-pretrained model and nothing else. :class:`SyntheticOnly` samples no
  client in any round, so its bytes are honestly zero (no client is contacted) and its accuracy is the pretrained
  model's in every round; it takes ``gptfl``'s FL rate (unused) instead of spending a search on it;
- ``gptfl``: the same pretraining, then FedAvg exactly as the scratch arm.

Targets (printed, never tuned for): GPT-FL above scratch and above synthetic-only (last-10 mean accuracy at equal
rounds), and GPT-FL reaching scratch's best seed-0 accuracy in fewer rounds.
"""

from __future__ import annotations

import numpy as np

from leantrain.federated.algorithms.gptfl import GPTFL

SETTINGS = {"num_clients": 40, "clients_per_round": 10, "local_steps": 10, "batch_size": 32, "momentum": 0.9,
            "eval_every": 2}  # fmt: skip
MODEL = {"name": "mlp", "hidden_sizes": [128, 128]}
MODEL_LABEL = "mlp-40-128-128-10"
PRETRAIN = {"synthetic": "mnist1d-synthetic", "pretrain_epochs": 10, "pretrain_lr": 0.05, "pretrain_batch_size": 64,
            "pretrain_momentum": 0.9}  # fmt: skip
SYNTHETIC_ONLY = "leantrain.bench.federated_pretrain:SyntheticOnly"


class SyntheticOnly(GPTFL):
    """GPT-FL's "synthetic only" baseline: the server's pretrained model, never trained federatedly.

    No client is sampled in any round (an empty cohort): nothing is sent or trained, the ledger stays at zero bytes
    and every evaluation sees the pretrained model."""

    name = "gptfl-synthetic-only"

    def sample(self, round_idx, k, rng, available):
        return []


def pretrain_arms(quick: bool) -> list[dict]:
    """The three arms as specs for ``tuned_rows`` / ``run_config`` (no lr or seed: those are added there)."""
    rounds = 10 if quick else 60
    base = {"partition": "dirichlet", "alpha": 0.1, "task": "dirichlet", "dataset": "mnist1d", "rounds": rounds,
            "model": MODEL, "model_label": MODEL_LABEL, "settings": dict(SETTINGS)}  # fmt: skip
    return [
        {**base, "key": "gptfl-scratch/dirichlet", "label": "gptfl-scratch", "algorithm": "fedavg", "options": {}},
        {**base, "key": "gptfl-synthetic-only/dirichlet", "label": "gptfl-synthetic-only", "algorithm": "gptfl",
         "class": SYNTHETIC_ONLY, "options": dict(PRETRAIN), "lr_from": "gptfl/dirichlet"},
        {**base, "key": "gptfl/dirichlet", "label": "gptfl", "algorithm": "gptfl", "options": dict(PRETRAIN)},
    ]  # fmt: skip


def rounds_to(curve: list, target: float) -> int | None:
    """Rounds run until the first evaluation at or above ``target`` (curve: (round index, accuracy) pairs)."""
    return next((int(r) + 1 for r, acc in curve if acc is not None and acc >= target), None)


def targets(rows: list[dict]) -> dict[str, bool]:
    """The issue's targets from the part's rows (arms that are missing are skipped)."""
    by = {r["method"]: r for r in rows}
    out: dict[str, bool] = {}
    if "gptfl" not in by:
        return out
    ours = by["gptfl"]["extra"]["last10_mean"]
    for label, key in (("gptfl-scratch", "above_scratch"), ("gptfl-synthetic-only", "above_synthetic_only")):
        if label in by:
            out[f"gptfl_{key}"] = ours > by[label]["extra"]["last10_mean"]
    if "gptfl-scratch" in by:
        scratch_curve = by["gptfl-scratch"]["extra"]["curve_seed0"]
        peak = float(np.max([acc for _, acc in scratch_curve]))
        mine, theirs = rounds_to(by["gptfl"]["extra"]["curve_seed0"], peak), rounds_to(scratch_curve, peak)
        out["gptfl_fewer_rounds_to_scratch_peak"] = mine is not None and mine < theirs
    return out
