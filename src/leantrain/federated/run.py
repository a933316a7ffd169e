"""``leantrain run <fed-recipe>``: a federated recipe through the simulator, with a run folder like any other run.

The recipe's ``federated:`` section picks the algorithm and the population; ``data``, ``model`` and ``optim`` (lr,
momentum, weight_decay) and ``data.batch_size`` mean what they mean elsewhere (the local training of each client).
The run folder holds ``config.yaml``, ``metrics.jsonl`` (one line per round: accuracy, loss, bytes up/down,
simulated time, events), ``summary.json`` and ``checkpoints/`` (the server state after every round);
``leantrain run resume=RUN_DIR`` continues from the latest round checkpoint to the same result as an uninterrupted
run (after Ctrl-C, which finishes the round in progress and checkpoints it, or after ``federated.stop_after=N``
rounds). Rounds are logged to metrics.jsonl as they finish.

Worker processes (:mod:`leantrain.federated.engines.workers`): ``federated.workers=N`` spawns N-1 more processes on
this machine, and ``torchrun --nproc-per-node=N -m leantrain run RECIPE ...`` (which also spans machines) starts N;
each trains a share of every round's clients and the results are those of one process. Rank 0 (this process, or
torchrun's rank 0) writes the run folder exactly as a one-process run; the other ranks write nothing (under
torchrun they start in :func:`torchrun_follower`). A resumed run needs the run folder readable by every rank.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from leantrain.errors import ConfigError, Interrupted


def run_federated(cfg, run_dir: Path, resume_from: Path | None = None) -> dict:
    """Run the recipe's federated simulation into ``run_dir`` (continuing ``resume_from``); returns the summary.

    With ``federated.workers`` > 1, or under ``torchrun``, the round's clients are trained by several processes and
    this process is rank 0."""
    from leantrain import process_group
    from leantrain.federated.engines.workers import WorkersEngine

    f = cfg.federated
    launched = process_group.torchrun_world()
    if launched is not None:
        rank, size = launched
        if f.workers not in (1, size):
            raise ConfigError(f"federated.workers={f.workers} but torchrun started {size} processes")
        if rank != 0:
            raise ConfigError("under torchrun start leantrain as a module (`torchrun ... -m leantrain run ...`) so "
                              "that only rank 0 opens a run folder")  # fmt: skip
        process_group.set_worker_threads(cfg.threads)
        process_group.init_from_env()
        try:
            return _lead(cfg, run_dir, resume_from, WorkersEngine(f.engine))
        finally:
            torch.distributed.destroy_process_group()
    if f.workers > 1:
        with process_group.launch(_spawned_follower, f.workers, args=(cfg, resume_from), threads=cfg.threads,
                                  label="federated worker"):  # fmt: skip
            return _lead(cfg, run_dir, resume_from, WorkersEngine(f.engine))
    return _lead(cfg, run_dir, resume_from, f.engine)


def build_simulator(cfg, engine, checkpoint_dir: Path | None):
    """The recipe's Simulator (every rank builds the same one)."""
    from leantrain.federated import ReplyGuard, Simulator, make_algorithm
    from leantrain.federated.clock import assign_profiles, lognormal_profiles
    from leantrain.federated.simulator import federated_data
    from leantrain.models.build import build_model_for_data

    f = cfg.federated
    options = {"alpha": f.alpha} if f.partition == "dirichlet" else {}
    devices = f.devices or None
    if f.device_spread:
        if f.devices:
            raise ConfigError("federated.devices and federated.device_spread exclude each other; give one")
        devices = lognormal_profiles(f.num_clients, **f.device_spread, seed=cfg.seed)
    if f.unlabeled_share:
        names = [d.name for d in devices] if isinstance(devices, list) else assign_profiles(f.num_clients, devices,
                                                                                            cfg.seed)  # fmt: skip
        options.update(unlabeled_share=f.unlabeled_share,
                       unlabeled_holders=[c for c, n in enumerate(names) if n.split("-")[0] == "strong"])  # fmt: skip
    data = federated_data(cfg.data.dataset, f.partition, f.num_clients, seed=cfg.seed,
                          train_subset=cfg.data.train_subset, **options)  # fmt: skip
    data_fields = {"input_shape": data.input_shape, "num_classes": data.num_classes}
    algorithm = make_algorithm(f.algorithm, **f.options)
    sim = Simulator(
        algorithm, lambda: build_model_for_data(cfg.model.name, cfg.model.options, data_fields), data,
        num_clients=f.num_clients, clients_per_round=f.clients_per_round, rounds=f.rounds,
        local_steps=f.local_steps, batch_size=cfg.data.batch_size, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay, devices=devices, dropout=f.client_dropout,
        failure=f.client_failure, eval_every=f.eval_every, seed=cfg.seed,
        checkpoint_dir=checkpoint_dir, checkpoint_every=f.checkpoint_every, engine=engine,
        guard=ReplyGuard(f.guard_norm_ratio, f.max_examples), availability=f.availability,
        time_budget_s=f.time_budget_s,
    )  # fmt: skip
    return sim


def _lead(cfg, run_dir: Path, resume_from: Path | None, engine) -> dict:
    """Rank 0 (or the only process): the simulation, the run folder, progress and the summary."""
    from leantrain.process_group import agreed
    from leantrain.train.interrupt import deferred_sigint
    from leantrain.train.metric_loggers import open_metric_loggers
    from leantrain.train.progress import make_progress, start_text

    f = cfg.federated
    started = time.perf_counter()
    sim = build_simulator(cfg, engine, run_dir / "checkpoints")
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
            history = sim.run(stop_after=f.stop_after, should_stop=lambda: agreed(interrupted.is_set()))
            if interrupted.is_set():
                status = "interrupted"
            elif sim.next_round < f.rounds and not sim.budget_spent():
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
        "threads": torch.get_num_threads(), "workers": workers_in_use(),
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if status == "interrupted":
        from leantrain.train.checkpoint import list_checkpoints

        kept = list_checkpoints(run_dir / "checkpoints")[-1]
        raise Interrupted(f"stopped after round {sim.next_round} of {f.rounds}; kept checkpoint {kept}")
    return summary


def workers_in_use() -> int:
    from leantrain.process_group import world

    return world()[1]


def follow_run(cfg, resume_from: Path | None) -> None:
    """A rank other than 0: the same simulation, silent (no run folder, evaluation, logs); stops when rank 0 does."""
    from leantrain.federated.engines.workers import WorkersEngine, follow
    from leantrain.process_group import agreed
    from leantrain.train.interrupt import deferred_sigint

    sim = build_simulator(cfg, WorkersEngine(cfg.federated.engine), None)
    follow(sim)
    if resume_from is not None:
        sim.restore(Path(resume_from))
    with deferred_sigint() as interrupted:
        sim.run(stop_after=cfg.federated.stop_after, should_stop=lambda: agreed(interrupted.is_set()))


def _spawned_follower(rank: int, size: int, cfg, resume_from: Path | None) -> None:
    follow_run(cfg, resume_from)


def torchrun_follower(cfg, resume_from: Path | None) -> None:
    """Under ``torchrun``, a rank other than 0 (see :mod:`leantrain.runs.follower`): join the group, follow rank 0."""
    from leantrain import process_group

    process_group.set_worker_threads(cfg.threads)
    process_group.init_from_env()  # after resume_from is known: rank 0 cannot write a checkpoint before we join
    try:
        follow_run(cfg, resume_from)
    finally:
        torch.distributed.destroy_process_group()
