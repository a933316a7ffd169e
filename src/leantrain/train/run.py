"""Run a resolved recipe: data → model → loop → run folder.

A run folder ``runs/<name>-<YYYYmmdd-HHMMSS>/`` holds ``config.yaml`` (the resolved config),
``metrics.jsonl`` (train and val records), ``summary.json`` (status and final metrics) and
``checkpoints/step-XXXXXXXX/`` (see :mod:`leantrain.train.checkpoint`). ``resume=RUN_DIR`` continues the
run in its own folder from its latest checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from leantrain import config as config_mod
from leantrain.config import RunConfig
from leantrain.errors import ConfigError, LeantrainError, NonFiniteLossError
from leantrain.finetune.methods import apply_method
from leantrain.lowrank.recipe import lowrank_callbacks
from leantrain.prune.recipe import pruned_metrics, var_transforms
from leantrain.train.checkpoint import list_checkpoints
from leantrain.train.loop import Trainer, TrainingInterrupted, evaluate, total_steps
from leantrain.train.metric_loggers import JsonlLogger
from leantrain.train.progress import make_progress
from leantrain.train.schedule import lr_factor
from leantrain.train.tasks import TASKS

# Fields that may differ between a run and its resumption: training longer is a legitimate resume.
RESUMABLE_CHANGES = {
    "resume", "progress", "threads", "train.epochs", "train.max_steps", "federated.stop_after", "marl.t_max",
}  # fmt: skip


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


@dataclass
class PreparedData:
    task: str
    train: object
    val: object
    test: object
    model_fields: dict  # data-dependent model config fields (input_shape, num_classes, vocab_size, ...)


def run(cfg: RunConfig) -> RunResult:
    """Train and evaluate ``cfg``; write the run folder; return its path and summary."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir, resume_from = _open_run_dir(cfg)
    if cfg.federated.algorithm is not None:
        from leantrain.federated.run import run_federated

        return RunResult(run_dir, run_federated(cfg, run_dir, resume=cfg.resume is not None))
    if cfg.marl.env is not None:
        from leantrain.marl.run import run_marl

        return RunResult(run_dir, run_marl(cfg, run_dir, resume_from))
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    data = prepare_data(cfg)
    task = TASKS[data.task]()
    model = build_run_model(cfg, data.model_fields)
    model = apply_method(
        model, cfg.finetune.method, cfg.finetune.options,
        score_batches=_first_batches(data.train, cfg.finetune.score_samples) if cfg.finetune.method == "gem" else None,
        loss_fn=lambda m, batch: task.loss(m, batch)[0],
    )  # fmt: skip

    def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, m, steps_per_epoch=len(data.train), train=data.train, task=task)

    start_epoch = _checkpoint_state(resume_from).get("epoch", 0)
    callbacks, lowrank_info = lowrank_callbacks(cfg.lowrank, model, cfg.train.epochs, start_epoch, make_optimizer)
    grad_transforms = var_transforms(cfg.prune, model)
    optimizer = make_optimizer(model)
    total = total_steps(len(data.train), cfg.train.epochs, cfg.train.max_steps)
    progress = make_progress(cfg.progress, total)
    logger = JsonlLogger(run_dir / "metrics.jsonl", drop_after_step=_checkpoint_state(resume_from).get("step"))
    t = cfg.train
    trainer = Trainer(
        model, optimizer, task, data.train,
        epochs=t.epochs, max_steps=t.max_steps,
        lr_schedule=lr_factor(t.schedule, total, t.warmup_steps, len(data.train), t.decay_epochs, t.decay_factor),
        grad_clip=t.grad_clip, grad_transforms=grad_transforms, callbacks=callbacks,
        eval_batches=data.val, eval_every=t.eval_every, log_every=t.log_every,
        checkpoint_dir=run_dir / "checkpoints", checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints, logger=logger, progress=progress,
    )  # fmt: skip
    summary = {"name": cfg.name, "run_dir": str(run_dir), "task": data.task, "metric_name": task.metric_name}
    summary["optimizer"] = type(optimizer).__name__
    summary.update(_param_counts(model))
    if lowrank_info:
        summary["lowrank"] = lowrank_info
    try:
        trainer.fit(resume_from=resume_from)
    except NonFiniteLossError as err:
        last = trainer.last_checkpoint
        _finish(run_dir, summary, trainer, "diverged", started, logger, progress)
        keep = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"{err}; training stopped and {keep}. Lower optim.lr or set train.grad_clip."
        ) from None
    except TrainingInterrupted as err:
        _finish(run_dir, summary, trainer, "interrupted", started, logger, progress)
        raise LeantrainError(f"interrupted at step {trainer.state.step}; checkpoint {err.checkpoint}. "
                             f"Continue with: leantrain run {cfg.name} resume={run_dir}") from None  # fmt: skip
    finally:
        _close(trainer.optimizer, summary)
    fresh = trainer.last_val is not None and trainer.last_val[0] == trainer.state.step
    val = trainer.last_val[1] if fresh else trainer.evaluate(data.val)
    summary["final"] = {
        **{f"val_{k}": v for k, v in val.items()},
        **{f"test_{k}": v for k, v in trainer.evaluate(data.test).items()},
    }
    if cfg.prune.eval_sparsities:
        progress.message(f"one-shot magnitude pruning at sparsities {list(cfg.prune.eval_sparsities)}")
        summary["pruned"] = pruned_metrics(
            model, cfg.prune.eval_sparsities, cfg.prune.prune_scope,
            lambda pruned: {f"test_{k}": v for k, v in evaluate(pruned, task, data.test).items()},
        )  # fmt: skip
    _finish(run_dir, summary, trainer, "completed", started, logger, progress)
    return RunResult(run_dir, summary)


def _close(optimizer, summary: dict) -> None:
    """Stop what an optimizer runs beside training (AsyncSAM's ascent process); keep its statistics."""
    close = getattr(optimizer, "close", None)
    if callable(close):
        close()
    stats = getattr(optimizer, "async_stats", None)
    if stats and stats["steps"]:
        summary["asyncsam"] = {k: dict(v) if isinstance(v, dict) else v for k, v in stats.items()}


def _finish(run_dir: Path, summary: dict, trainer: Trainer, status: str, started: float, logger, progress) -> None:
    progress.close()
    logger.close()
    summary.update(
        status=status,
        steps=trainer.state.step,
        epochs_done=trainer.state.epoch,
        train_time_s=round(trainer.state.elapsed_s, 3),
        wall_time_s=round(time.perf_counter() - started, 3),
        best_val=trainer.state.best_val,
        checkpoint=str(trainer.last_checkpoint) if trainer.last_checkpoint else None,
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))


# ---------------------------------------------------------------- run folder


def _open_run_dir(cfg: RunConfig) -> tuple[Path, Path | None]:
    if cfg.resume is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}-{suffix}"
        run_dir.mkdir(parents=True)
        config_mod.save(cfg, run_dir / "config.yaml")
        return run_dir, None
    run_dir = Path(cfg.resume)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"resume={run_dir} is not a run folder (no config.yaml)")
    saved = config_mod.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    changed = _diff(config_mod.to_dict(saved), config_mod.to_dict(cfg)) - RESUMABLE_CHANGES
    if changed:
        raise ConfigError(f"resume={run_dir}: the config differs from the saved run in {', '.join(sorted(changed))}")
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        raise ConfigError(f"resume={run_dir}: no checkpoint to resume from")
    config_mod.save(cfg, run_dir / "config.yaml")
    return run_dir, checkpoints[-1]


def _diff(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set(a) | set(b)
    out = set()
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.add(prefix + key)
    return out


def _checkpoint_state(path: Path | None) -> dict:
    """The loop state saved with a checkpoint (step, epoch, ...), or {} without one."""
    return {} if path is None else json.loads((path / "state.json").read_text())


# ---------------------------------------------------------------- data, model, optimizer


def prepare_data(cfg: RunConfig) -> PreparedData:
    """Load the dataset and turn its splits into mini-batch iterables for the task."""
    from leantrain.data import ArrayBatches, dataset_options, lm_blocks, load_dataset, tokenize_texts

    d = cfg.data
    tokenizer = _tokenizer_for(cfg)
    options = {"tokenizer": tokenizer} if tokenizer is not None and "tokenizer" in dataset_options(d.dataset) else {}
    ds = load_dataset(
        d.dataset, seed=cfg.seed, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
        train_subset=d.train_subset, **options,
    )  # fmt: skip
    task = cfg.task if cfg.task != "auto" else ("language-modeling" if ds.kind == "lm" else "classification")
    fields: dict = {}

    def batches(split, train: bool):
        size = d.batch_size if train else d.eval_batch_size
        n = len(split) if train or d.eval_subset is None else min(len(split), d.eval_subset)
        common = {"shuffle": train, "seed": cfg.seed, "drop_last": False}
        if ds.kind == "lm":
            x, y = lm_blocks(split.x, d.block_size)
            n = len(x) if train or d.eval_subset is None else min(len(x), d.eval_subset)
            return ArrayBatches({"x": x[:n], "labels": y[:n]}, size, **common)
        if ds.kind == "text":
            if tokenizer is None:
                raise ConfigError(f"dataset {d.dataset!r} is text: set data.tokenizer (e.g. data.tokenizer=minilm)")
            tok = tokenize_texts(tokenizer, split.x[:n], d.max_length)
            arrays = {"input_ids": tok.input_ids, "labels": split.y[:n]}
            return ArrayBatches(arrays, size, trim_key="input_ids", lengths=tok.lengths, **common)
        return ArrayBatches({"x": split.x[:n], "labels": split.y[:n]}, size, **common)

    if ds.kind == "lm":
        fields.update(vocab_size=len(tokenizer) if tokenizer is not None else ds.vocab_size, block_size=d.block_size)
    elif ds.kind == "text":
        fields.update(num_classes=ds.num_classes, vocab_size=len(tokenizer) if tokenizer else None)
        if tokenizer is not None and tokenizer.pad_token_id is not None:
            fields["pad_token_id"] = tokenizer.pad_token_id
    else:
        fields.update(num_classes=ds.num_classes, input_shape=tuple(ds.input_shape))
    return PreparedData(task, batches(ds.train, True), batches(ds.val, False), batches(ds.test, False), fields)


def _first_batches(batches, samples: int) -> list[dict]:
    """The epoch-0 training batches covering the first ``samples`` samples (GEM's scoring pass)."""
    batches.set_epoch(0)
    out, seen = [], 0
    for batch in batches:
        if seen >= samples:
            break
        out.append(batch)
        seen += len(batch["labels"])
    return out


def _tokenizer_for(cfg: RunConfig):
    """``data.tokenizer`` if set, else the model's own tokenizer if it is a pretrained model, else None."""
    from leantrain.models import load_tokenizer, tokenizer_names

    name = cfg.data.tokenizer or (cfg.model.name if cfg.model.name in tokenizer_names() else None)
    return None if name is None else load_tokenizer(name)


def build_run_model(cfg: RunConfig, data_fields: dict) -> nn.Module:
    """Build the model, filling data-dependent config fields the recipe left unset."""
    from leantrain.models import build_model, model_config_class

    names = {f for f in model_config_class(cfg.model.name).__dataclass_fields__}
    kwargs = {k: v for k, v in data_fields.items() if k in names and v is not None}
    kwargs.update(cfg.model.options)
    return build_model(cfg.model.name, **kwargs)


BASE_OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def build_optimizer(
    cfg: RunConfig, model: nn.Module, steps_per_epoch: int = 1, train=None, task=None
) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters (the SAM family wraps ``optim.base``; mL-BFGS).

    AsyncSAM with an ascent batch (``optim.ascent_batch_size`` or ``optim.mode=two_process``) samples it from the
    training rows (``train.tensors``) and uses ``task.loss``.
    """
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LeantrainError("the model has no trainable parameters")
    try:
        return _make_optimizer(o, model, params, steps_per_epoch, _ascent(cfg, train, task))
    except ValueError as err:  # torch's own argument checks (betas, nesterov without momentum, ...)
        raise ConfigError(f"optim: {err}") from None


def _ascent(cfg: RunConfig, train, task):
    o = cfg.optim
    if o.name != "asyncsam" or (o.mode == "sequential" and o.ascent_batch_size is None):
        return None
    from leantrain.optim import Ascent

    if train is None or task is None or not hasattr(train, "tensors"):
        raise ConfigError("optim: AsyncSAM with an ascent batch needs the training rows and task (run through `run`)")
    return Ascent(task.loss, train.tensors, batch_size=o.ascent_batch_size or "auto", seed=cfg.seed)


def _make_optimizer(o, model: nn.Module, params: list, steps_per_epoch: int, ascent) -> torch.optim.Optimizer:
    from leantrain.optim import MLBFGS, SAM, AsyncSAM, LayerwiseSAM

    if o.name == "mlbfgs":
        return MLBFGS(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, beta_param=o.beta,
                      beta_grad=o.beta, beta_pair=o.beta_pair, update_freq=o.update_freq,
                      history_size=o.history_size, damping=o.damping, direction_scaling=o.direction_scaling,
                      kl_clip=o.kl_clip)  # fmt: skip
    base = o.base if o.name in ("sam", "lwsam", "asyncsam") else o.name
    if base == "sgd":
        kwargs = {"lr": o.lr, "momentum": o.momentum, "nesterov": o.nesterov, "weight_decay": o.weight_decay}
    else:
        kwargs = {"lr": o.lr, "betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay}
    if o.name == "sam":
        return SAM(params, base_optimizer=BASE_OPTIMIZERS[base], rho=o.rho, adaptive=o.adaptive, **kwargs)
    if o.name == "asyncsam":
        return AsyncSAM(params, base_optimizer=BASE_OPTIMIZERS[base], rho=o.rho, staleness=o.staleness,
                        adaptive=o.adaptive, model=model, ascent=ascent, mode=o.mode, on_miss=o.on_miss,
                        slowdown=o.slowdown, worker_cpu=o.worker_cpu, **kwargs)  # fmt: skip
    if o.name == "lwsam":
        every = o.reselect_every or steps_per_epoch
        return LayerwiseSAM(model, base_optimizer=BASE_OPTIMIZERS[base], rho=o.rho, num_layers=o.num_layers,
                            reselect_every=every, **kwargs)  # fmt: skip
    return BASE_OPTIMIZERS[base](params, **kwargs)


def _param_counts(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total_params": total, "trainable_params": trainable}
