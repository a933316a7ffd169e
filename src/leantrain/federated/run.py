"""``leantrain run <fed-recipe>``: a federated recipe through the simulator, with a run folder like any other run.

The recipe's ``federated:`` section picks the algorithm and the population; ``data``, ``model`` and ``optim`` (lr,
momentum, weight_decay) and ``data.batch_size`` mean what they mean elsewhere (the local training of each client).
The run folder holds ``config.yaml``, ``metrics.jsonl`` (one line per round: accuracy, loss, bytes up/down,
simulated time, events), ``summary.json`` and ``checkpoints/`` (the server state after every round);
``leantrain run resume=RUN_DIR`` continues from the latest round checkpoint to the same result as an uninterrupted
run (after Ctrl-C, which finishes the round in progress and checkpoints it, or after ``federated.stop_after=N``
rounds). Rounds are logged to metrics.jsonl as they finish.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from leantrain.errors import Interrupted


def run_federated(cfg, run_dir: Path, resume_from: Path | None = None) -> dict:
    """Run the recipe's federated simulation into ``run_dir`` (continuing ``resume_from``); returns the summary."""
    from leantrain.federated import ReplyGuard, Simulator, make_algorithm
    from leantrain.federated.simulator import federated_data
    from leantrain.models.build import build_model_for_data
    from leantrain.train.interrupt import deferred_sigint
    from leantrain.train.metric_loggers import open_metric_loggers
    from leantrain.train.progress import make_progress, start_text

    f = cfg.federated
    started = time.perf_counter()
    options = {"alpha": f.alpha} if f.partition == "dirichlet" else {}
    data = federated_data(cfg.data.dataset, f.partition, f.num_clients, seed=cfg.seed,
                          train_subset=cfg.data.train_subset, **options)  # fmt: skip
    data_fields = {"input_shape": data.input_shape, "num_classes": data.num_classes}
    algorithm = make_algorithm(f.algorithm, **f.options)
    sim = Simulator(
        algorithm, lambda: build_model_for_data(cfg.model.name, cfg.model.options, data_fields), data,
        num_clients=f.num_clients, clients_per_round=f.clients_per_round, rounds=f.rounds,
        local_steps=f.local_steps, batch_size=cfg.data.batch_size, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay, devices=f.devices or None, dropout=f.client_dropout,
        failure=f.client_failure, eval_every=f.eval_every, seed=cfg.seed,
        checkpoint_dir=run_dir / "checkpoints", checkpoint_every=f.checkpoint_every, engine=f.engine,
        guard=ReplyGuard(f.guard_norm_ratio, f.max_examples),
    )  # fmt: skip
    if resume_from is not None:
        sim.restore(resume_from)
    done = sim.next_round
    budget = f"{f.rounds} rounds of {f.clients_per_round}/{f.num_clients} clients ({f.algorithm})"
    progress = make_progress(cfg.progress, f.rounds, completed=done, unit="round",
                             start=start_text(run_dir, budget, done or None))  # fmt: skip
    logger = open_metric_loggers(run_dir, cfg.log_formats, x_key="round", resume_after=done - 1 if done else None)

    def on_round(row: dict) -> None:
        logger.log(row)
        shown = {k: row[k] for k in ("test_accuracy", "train_loss") if row.get(k) is not None}
        shown["MB up"] = row["up_bytes"] / 1e6
        progress.update(row["round"] + 1, shown)
        if row["events"]:
            progress.message(f"round {row['round'] + 1}: " + "; ".join(row["events"][:3])
                             + (" ..." if len(row["events"]) > 3 else ""))  # fmt: skip

    sim.on_round = on_round
    status = "completed"
    try:
        with deferred_sigint() as interrupted:
            history = sim.run(stop_after=f.stop_after, should_stop=interrupted.is_set)
            if interrupted.is_set():
                status = "interrupted"
            elif sim.next_round < f.rounds:
                status = "stopped"
    finally:
        progress.close()
        logger.close()
    summary = {
        "name": cfg.name, "run_dir": str(run_dir), "kind": "federated", "task": "federated-classification",
        "metric_name": "accuracy", "algorithm": f.algorithm, "status": status, "rounds": f.rounds,
        "rounds_done": sim.next_round, "resumed_from_round": done or None,
        "trainable_params": sum(p.numel() for p in sim.model.parameters() if p.requires_grad),
        "final": {"test_accuracy": history.last("test_accuracy"), "test_loss": history.last("test_loss"),
                  "last10_test_accuracy": history.window_mean("test_accuracy")},
        "totals": history.totals, "wall_time_s": round(time.perf_counter() - started, 3),
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if status == "interrupted":
        from leantrain.train.checkpoint import list_checkpoints

        kept = list_checkpoints(run_dir / "checkpoints")[-1]
        raise Interrupted(f"stopped after round {sim.next_round} of {f.rounds}; kept checkpoint {kept}")
    return summary
