"""``leantrain run <fed-recipe>``: a federated recipe through the simulator, with a run folder like any other run.

The recipe's ``federated:`` section picks the algorithm and the population; ``data``, ``model`` and ``optim`` (lr,
momentum, weight_decay) and ``data.batch_size`` mean what they mean elsewhere (the local training of each client).
The run folder holds ``config.yaml``, ``metrics.jsonl`` (one line per round: accuracy, loss, bytes up/down,
simulated time, events), ``summary.json`` and ``checkpoints/`` (the server state after every round);
``resume=RUN_DIR`` continues from the latest round to the same result as an uninterrupted run (after Ctrl-C, which
loses only the round in progress, or after ``federated.stop_after=N`` rounds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from leantrain.errors import LeantrainError


def run_federated(cfg, run_dir: Path, resume: bool):
    """Run the recipe's federated simulation into ``run_dir``; returns the summary dict."""
    from leantrain.federated import Simulator, make_algorithm
    from leantrain.federated.simulator import federated_data
    from leantrain.train.run import build_run_model

    f = cfg.federated
    started = time.perf_counter()
    options = {"alpha": f.alpha} if f.partition == "dirichlet" else {}
    data = federated_data(cfg.data.dataset, f.partition, f.num_clients, seed=cfg.seed,
                          train_subset=cfg.data.train_subset, **options)  # fmt: skip
    data_fields = {"input_shape": data.input_shape, "num_classes": data.num_classes}
    algorithm = make_algorithm(f.algorithm, **f.options)
    metrics_path = run_dir / "metrics.jsonl"

    def log(line: str) -> None:
        if cfg.progress != "none":
            print(line, flush=True)

    sim = Simulator(
        algorithm, lambda: build_run_model(cfg, data_fields), data,
        num_clients=f.num_clients, clients_per_round=f.clients_per_round, rounds=f.rounds,
        local_steps=f.local_steps, batch_size=cfg.data.batch_size, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay, devices=f.devices or None, dropout=f.client_dropout,
        failure=f.client_failure, eval_every=f.eval_every_rounds, seed=cfg.seed,
        checkpoint_dir=run_dir / "checkpoints", log=log,
    )  # fmt: skip
    if resume and not sim.restore():
        raise LeantrainError(f"resume={run_dir}: no round checkpoint to continue from")
    done = sim.next_round
    status = "completed"
    try:
        history = sim.run(stop_after=f.stop_after)
        if sim.next_round < f.rounds:
            status = "stopped"
    except KeyboardInterrupt:
        history, status = sim.history, "interrupted"
    finally:
        with metrics_path.open("w") as out:  # rewritten from the history: a resumed run never duplicates lines
            for row in sim.history.rounds:
                out.write(json.dumps(row) + "\n")
    summary = {
        "name": cfg.name, "run_dir": str(run_dir), "task": "federated-classification", "metric_name": "accuracy",
        "algorithm": f.algorithm, "status": status, "rounds": f.rounds, "rounds_done": sim.next_round,
        "resumed_from_round": done or None,
        "trainable_params": sum(p.numel() for p in sim.model.parameters() if p.requires_grad),
        "final": {"test_accuracy": history.last("test_accuracy"), "test_loss": history.last("test_loss")},
        "totals": history.totals, "wall_time_s": round(time.perf_counter() - started, 3),
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if status == "interrupted":
        raise LeantrainError(f"interrupted after round {sim.next_round}; continue with: leantrain run {cfg.name} "
                             f"resume={run_dir}")  # fmt: skip
    return summary
