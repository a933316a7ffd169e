"""Is on-device KD's loss on Fashion-MNIST (50 rounds) the teacher's fault? Change only the teacher and rerun.

    .venv/bin/python docs/scripts/kd_teacher_diagnosis.py [rounds]

The setting of ``leantrain bench federated --part weak`` (leantrain.bench.federated_kd), seed 0, validation rows,
lr 0.02 (the rate the bench chose for kd), with the auxiliary model A at 0.25 width (the bench's, conv 8-16 / hidden
32) and at 0.5 width (conv 16-32 / hidden 64); prints T's and A's final and last-10 validation accuracy and, for
reference, kd_weight 0 (the distillation step off: T trained by CE alone on the same cohorts). docs/ondevice_kd.md's
diagnosis table came from this command.
"""

import json
import sys

import numpy as np
import torch

from leantrain.bench.federated import _data
from leantrain.bench.federated_kd import DEVICES, SETTINGS, STRONG_PER_ROUND, TARGET
from leantrain.federated import Simulator, make_algorithm
from leantrain.federated.simulator import evaluate_state
from leantrain.models.build import build_model_for_data


def run(aux: dict, kd_weight: float, rounds: int) -> dict:
    torch.set_num_threads(1)
    spec = {"partition": "dirichlet", "alpha": 0.1, "dataset": "fashion-mnist", "seed": 0, "tune": True,
            "devices": DEVICES, "unlabeled_share": 0.5, "settings": SETTINGS}  # fmt: skip
    data = _data(spec)
    fields = {"input_shape": data.input_shape, "num_classes": data.num_classes}
    target = {k: v for k, v in TARGET.items() if k != "name"}
    kd = make_algorithm("kd", aux_model=aux, strong_per_round=STRONG_PER_ROUND, rampup_rounds=round(0.75 * rounds),
                        kd_weight=kd_weight)  # fmt: skip
    sim = Simulator(kd, lambda: build_model_for_data("cnn", target, fields), data, rounds=rounds, seed=0, lr=0.02,
                    devices=DEVICES, engine="sequential", **SETTINGS)  # fmt: skip
    aux_acc = []
    sim.on_round = lambda row: aux_acc.append(evaluate_state(kd.aux, kd.aux_state(), data.test)["accuracy"]) if (
        "test_accuracy" in row) else None
    history = sim.run()
    t = [r["test_accuracy"] for r in history.rounds if r.get("test_accuracy") is not None]
    return {"aux": aux, "kd_weight": kd_weight, "T_final": t[-1], "T_last10": float(np.mean(t[-10:])),
            "A_final": aux_acc[-1], "A_last10": float(np.mean(aux_acc[-10:]))}


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    for aux, weight in (({"name": "cnn", "channels": [8, 16], "hidden": 32}, 0.5),
                        ({"name": "cnn", "channels": [16, 32], "hidden": 64}, 0.5),
                        ({"name": "cnn", "channels": [8, 16], "hidden": 32}, 0.0)):  # fmt: skip
        print(json.dumps(run(aux, weight, rounds)), flush=True)
