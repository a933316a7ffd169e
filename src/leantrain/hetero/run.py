"""``leantrain run <hetero-recipe>``: workers of different speed training one model, with a run folder.

The recipe's ``hetero:`` section picks the method (sync, local-uniform, biased), one slowdown per worker, the clock
and the budget; ``data``, ``model`` and ``optim`` (lr, momentum, weight_decay) mean what they mean elsewhere.

- ``hetero.clock=virtual`` (default): one process hosts every worker; time comes from the slowdowns, so the
  accuracy-against-time curve is deterministic.
- ``hetero.clock=real``: one process per worker. ``leantrain run`` spawns them itself on this machine (gloo,
  loopback); ``torchrun --nnodes=M --nproc-per-node=K -m leantrain run RECIPE ...`` starts them on several machines
  (rank 0 writes the run folder; the others follow in :func:`torchrun_follower`).

A worker that dies, or a collective that waits longer than ``hetero.collective_timeout_s``, ends every process with
one error naming the worker; Ctrl-C stops all processes after the round in progress (the records so far and the
summary are kept). The run folder holds ``config.yaml``, ``metrics.jsonl`` (one line per evaluation: time_s, round,
epoch, per-worker steps / busy / waiting seconds, wait_share, train loss, <split>_accuracy and _loss) and
``summary.json``. Hetero runs keep no checkpoints (they are short); a stopped run is rerun, not resumed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from leantrain.errors import ConfigError, Interrupted


def _backend(cfg) -> str:
    h = cfg.hetero
    if h.backend != "auto":
        return h.backend
    return "nccl" if h.devices and all(d.startswith("cuda") for d in h.devices) else "gloo"


def process_count(cfg) -> int:
    """Processes the recipe's workers run in (see ``hetero.processes``)."""
    h = cfg.hetero
    if h.processes is not None:
        return h.processes
    return len(h.slowdowns) if h.clock == "real" else 1


def build_trainer(cfg):
    """The recipe's trainer and its evaluation rows (every process builds the same trainer)."""
    from leantrain.data import load_dataset
    from leantrain.hetero.methods import make_method
    from leantrain.hetero.trainer import HeteroTrainer
    from leantrain.models.build import build_model_for_data

    h = cfg.hetero
    ds = load_dataset(cfg.data.dataset, seed=cfg.seed, train_subset=cfg.data.train_subset)
    if ds.train.y is None:
        raise ConfigError(f"dataset {cfg.data.dataset!r} has no labels; hetero training needs a classification set")
    fields = {"input_shape": ds.input_shape, "num_classes": ds.num_classes}
    rows = ds.test if h.eval_split == "test" else ds.val
    limit = cfg.data.eval_subset or len(rows.y)
    eval_rows = (torch.as_tensor(rows.x[:limit]), torch.as_tensor(rows.y[:limit]))
    trainer = HeteroTrainer(
        lambda: build_model_for_data(cfg.model.name, cfg.model.options, fields),
        torch.as_tensor(ds.train.x), torch.as_tensor(ds.train.y), make_method(h.method, **h.options), h.slowdowns,
        period_steps=h.period_steps, batch_size=cfg.data.batch_size, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay, lr_milestones=h.lr_milestones, lr_gamma=h.lr_gamma, seed=cfg.seed,
        clock=h.clock, step_time_s=h.step_time_s, devices=h.devices or None, emulate_slowdowns=h.emulate_slowdowns,
        period_s=h.period_s,
    )  # fmt: skip
    return trainer, eval_rows


def run_hetero(cfg, run_dir: Path, resume_from: Path | None = None) -> dict:
    """Run the recipe into ``run_dir``; with several processes this process is rank 0. Returns the summary."""
    from leantrain import process_group

    size = process_count(cfg)
    launched = process_group.torchrun_world()
    if launched is not None:
        rank, world = launched
        if cfg.hetero.processes not in (None, world):
            raise ConfigError(f"hetero.processes={cfg.hetero.processes} but torchrun started {world} processes")
        if rank != 0:
            raise ConfigError("under torchrun start leantrain as a module (`torchrun ... -m leantrain run ...`) so "
                              "that only rank 0 opens a run folder")  # fmt: skip
        process_group.set_worker_threads(cfg.threads)
        process_group.init_from_env(_backend(cfg), cfg.hetero.collective_timeout_s)
        try:
            return _lead(cfg, run_dir)
        finally:
            torch.distributed.destroy_process_group()
    if size > 1:
        with process_group.launch(_spawned_follower, size, args=(cfg,), threads=cfg.threads, label="hetero worker",
                                  timeout_s=cfg.hetero.collective_timeout_s, backend=_backend(cfg)):  # fmt: skip
            return _lead(cfg, run_dir)
    return _lead(cfg, run_dir)


def _budget(cfg) -> tuple[str, float | None, float | None]:
    h = cfg.hetero
    if h.time_budget_s is None and h.epochs is None:
        raise ConfigError("a hetero recipe needs hetero.time_budget_s or hetero.epochs")
    parts = [f"{h.time_budget_s:g} {h.clock} s" if h.time_budget_s else "", f"{h.epochs:g} epochs" if h.epochs else ""]
    return " or ".join(p for p in parts if p), h.time_budget_s, h.epochs


def _lead(cfg, run_dir: Path) -> dict:
    """Rank 0 (or the only process): training, the run folder, progress and the summary."""
    from leantrain.process_group import world
    from leantrain.train.interrupt import deferred_sigint
    from leantrain.train.metric_loggers import open_metric_loggers
    from leantrain.train.progress import make_progress, start_text

    h = cfg.hetero
    started = time.perf_counter()
    budget_text, time_budget, epochs = _budget(cfg)
    trainer, (ex, ey) = build_trainer(cfg)
    workers = len(h.slowdowns)
    what = (f"{h.method} on {workers} workers (slowdowns {', '.join(f'{s:g}' for s in h.slowdowns)}; local steps "
            f"{trainer.steps}), {budget_text}")  # fmt: skip
    progress = make_progress(cfg.progress, 100, unit="%", start=start_text(run_dir, what))
    logger = open_metric_loggers(run_dir, cfg.log_formats, x_key="time_s")
    split = h.eval_split

    def evaluate() -> dict:
        return {f"{split}_{k}": v for k, v in trainer.evaluate(ex, ey).items()}

    def on_eval(row: dict) -> None:
        logger.log(row)
        done = max(row["time_s"] / time_budget if time_budget else 0.0, row["epoch"] / epochs if epochs else 0.0)
        progress.update(min(100, int(100 * done)), {k: row[k] for k in (f"{split}_accuracy", "wait_share")})

    status = "completed"
    try:
        with deferred_sigint() as interrupted:
            last = trainer.run(time_budget_s=time_budget, epochs=epochs, eval_every_s=h.eval_every_s,
                               eval_fn=evaluate, on_eval=on_eval, should_stop=interrupted.is_set)  # fmt: skip
            if interrupted.is_set() or last.get("stopped"):
                status = "interrupted"
    finally:
        progress.close()
        logger.close()
    summary = {
        "name": cfg.name, "run_dir": str(run_dir), "kind": "hetero", "task": "classification",
        "metric_name": "accuracy", "method": h.method, "status": status, "clock": h.clock,
        "processes": world()[1], "slowdowns": h.slowdowns, "local_steps": trainer.steps,
        "weights": trainer.weights, "rounds": last["round"], "epochs": last["epoch"], "time_s": last["time_s"],
        "steps": last["steps"], "busy_s": last["busy_s"], "wait_s": last["wait_s"], "wait_share": last["wait_share"],
        "final": {k: v for k, v in last.items() if k.startswith(f"{split}_")},
        "trainable_params": sum(p.numel() for p in trainer.models[0].parameters() if p.requires_grad),
        "wall_time_s": round(time.perf_counter() - started, 3), "threads": torch.get_num_threads(),
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if status == "interrupted":
        raise Interrupted(f"stopped at {last['time_s']:.1f} s ({last['round']} rounds); the records and the summary "
                          f"are in {run_dir} (hetero runs are rerun, not resumed)")  # fmt: skip
    return summary


def follow(cfg) -> None:
    """A rank other than 0: train this process's workers, silently, until rank 0 stops."""
    from leantrain.train.interrupt import deferred_sigint

    _, time_budget, epochs = _budget(cfg)
    trainer, _ = build_trainer(cfg)
    with deferred_sigint() as interrupted:
        trainer.run(time_budget_s=time_budget, epochs=epochs, eval_every_s=cfg.hetero.eval_every_s,
                    should_stop=interrupted.is_set)  # fmt: skip


def _spawned_follower(rank: int, size: int, cfg) -> None:
    follow(cfg)


def torchrun_follower(cfg, resume_from: Path | None) -> None:
    """Under ``torchrun``, a rank other than 0 (see :mod:`leantrain.runs.follower`): join the group, follow rank 0."""
    from leantrain import process_group

    if resume_from is not None:
        raise ConfigError("hetero runs keep no checkpoints; rerun the recipe instead of resuming it")
    process_group.set_worker_threads(cfg.threads)
    process_group.init_from_env(_backend(cfg), cfg.hetero.collective_timeout_s)
    try:
        follow(cfg)
    finally:
        torch.distributed.destroy_process_group()
