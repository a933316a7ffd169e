"""On-device KD in the project spec's CPU plan (federated §5.5), where the teacher has time to converge.

    .venv/bin/python docs/scripts/kd_digits_regime.py [seeds]

digits (sklearn), 40 clients, Dirichlet α = 0.3 over half of the training rows, the other half held unlabeled by
the 8 strong clients; T = MLP 64-256-128-10, A = MLP 64-32-10; 10 of 40 clients train A per round, all 8 strong
clients train T (the official rule); τ = 10, momentum 0.9, 150 rounds, KD ramp-up over 100. The same four arms as
``leantrain bench federated --part weak`` (kd, kd-no-weak, kd-strong-only, kd-aux-only), each with its learning
rate chosen on validation, then the seeds on test, through the bench's own machinery. docs/ondevice_kd.md's
"digits, 150 rounds" table came from this command.
"""

import sys

from leantrain.bench.federated import tuned_rows

T = {"name": "mlp", "hidden_sizes": [256, 128]}
A = {"name": "mlp", "hidden_sizes": [32]}
SETTINGS = {"num_clients": 40, "clients_per_round": 10, "local_steps": 10, "batch_size": 32, "momentum": 0.9,
            "eval_every": 5}  # fmt: skip


def arms() -> list[dict]:
    kd = {"rampup_rounds": 100, "aux_model": A}
    table = {
        "kd": ("kd", kd, T, {}),
        "kd-no-weak": ("kd", {**kd, "aux_clients": "strong"}, T, {}),
        "kd-strong-only": ("strong-only", {}, T, {"clients_per_round": 8}),
        "kd-aux-only": ("fedavg", {}, A, {}),
    }
    return [{"key": f"{label}/digits", "label": label, "algorithm": algorithm, "options": options,
             "partition": "dirichlet", "alpha": 0.3, "task": "digits-150-rounds", "dataset": "digits", "rounds": 150,
             "devices": {"weak": 0.8}, "unlabeled_share": 0.5, "model": model,
             "model_label": "mlp-64-256-128-10" if model is T else "mlp-64-32-10",
             "settings": {**SETTINGS, **settings}} for label, (algorithm, options, model, settings) in table.items()]


if __name__ == "__main__":
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    for row in tuned_rows(arms(), seeds, False, "kd-digits", "kd-strong-only"):
        e = row["extra"]
        print(f"| {row['method']} | {e['lr']:g} | {row['metric']:.4f} ± {row['metric_std']:.4f} | "
              f"{e['last10_mean']:.4f} ± {e['last10_std']:.4f} | {row['bytes_up'] / 1e6:.1f} |")
