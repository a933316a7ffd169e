"""Supervised recipes: data -> model -> (fine-tuning method, low-rank schedule, regularizer) -> the loop.

The runner of the ``supervised`` run kind (see :mod:`leantrain.runs.kinds`): it fills a run folder with
``metrics.jsonl`` (train and val records), ``summary.json`` (status and final metrics) and
``checkpoints/step-XXXXXXXX/`` (see :mod:`leantrain.train.checkpoint`); ``resume_from`` continues the run from one.
:func:`prepare_data` and :func:`build_optimizer` are also what the benchmarks use to build a recipe's pieces.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leantrain.config import RunConfig
from leantrain.errors import ConfigError, Interrupted, LeantrainError, NonFiniteLossError
from leantrain.finetune.methods import apply_method
from leantrain.lowrank.recipe import lowrank_callbacks
from leantrain.models.build import build_model_for_data
from leantrain.process_memory import peak_rss_mb
from leantrain.prune.recipe import pruned_metrics, var_transforms
from leantrain.train.loop import Trainer, TrainingInterrupted, evaluate, total_steps
from leantrain.train.metric_loggers import open_metric_loggers
from leantrain.train.progress import make_progress, start_text
from leantrain.train.schedule import lr_factor
from leantrain.train.tasks import TASKS


@dataclass
class PreparedData:
    task: str
    train: object
    val: object
    test: object
    model_fields: dict  # data-dependent model config fields (input_shape, num_classes, vocab_size, ...)


def run_supervised(cfg: RunConfig, run_dir: Path, resume_from: Path | None) -> dict:
    """Train and evaluate ``cfg`` into ``run_dir``; returns the summary (also written to summary.json)."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    data = prepare_data(cfg)
    task = TASKS[data.task]()
    model = build_model_for_data(cfg.model.name, cfg.model.options, data.model_fields)
    model = apply_method(
        model, cfg.finetune.method, cfg.finetune.options,
        score_batches=first_batches(data.train, cfg.finetune.score_samples) if cfg.finetune.method == "gem" else None,
        loss_fn=lambda m, batch: task.loss(m, batch)[0],
    )  # fmt: skip

    def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, m, steps_per_epoch=len(data.train), train=data.train, task=task)

    resumed = _checkpoint_state(resume_from)
    callbacks, lowrank_info = lowrank_callbacks(cfg.lowrank, model, cfg.train.epochs, resumed.get("epoch", 0),
                                                make_optimizer)  # fmt: skip
    grad_transforms = var_transforms(cfg.prune, model)
    optimizer = make_optimizer(model)
    total = total_steps(len(data.train), cfg.train.epochs, cfg.train.max_steps)
    t = cfg.train
    budget = f"{total} steps" + ("" if t.max_steps else f" ({t.epochs} epochs of {len(data.train)} batches)")
    progress = make_progress(cfg.progress, total, completed=resumed.get("step", 0),
                             start=start_text(run_dir, budget, resumed.get("step")))  # fmt: skip
    logger = open_metric_loggers(run_dir, cfg.log_formats, x_key="step", resume_after=resumed.get("step"))
    trainer = Trainer(
        model, optimizer, task, data.train,
        epochs=t.epochs, max_steps=t.max_steps,
        lr_schedule=lr_factor(t.schedule, total, t.warmup_steps, len(data.train), t.decay_epochs, t.decay_factor),
        grad_clip=t.grad_clip, grad_transforms=grad_transforms, callbacks=callbacks,
        eval_batches=data.val, eval_every=t.eval_every, log_every=t.log_every,
        checkpoint_dir=run_dir / "checkpoints", checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints, logger=logger, progress=progress,
    )  # fmt: skip
    summary = {"name": cfg.name, "run_dir": str(run_dir), "kind": "supervised", "task": data.task,
               "metric_name": task.metric_name, "optimizer": type(optimizer).__name__}  # fmt: skip
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
        raise Interrupted(
            f"stopped after step {trainer.state.step} of {total}; kept checkpoint {err.checkpoint}"
        ) from None
    finally:
        _close(trainer.optimizer, summary)
    progress.message("final evaluation on the val and test splits")
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
    return summary


def _close(optimizer, summary: dict) -> None:
    """Stop what an optimizer runs beside training (AsyncSAM's ascent process); keep its statistics."""
    close = getattr(optimizer, "close", None)
    if callable(close):
        close()
    stats = getattr(optimizer, "async_stats", None)
    if stats and stats["steps"]:
        summary["asyncsam"] = {k: dict(v) if isinstance(v, dict) else v for k, v in stats.items()}


def _finish(run_dir: Path, summary: dict, trainer: Trainer, status: str, started: float, logger, progress) -> None:
    import statistics

    progress.close()
    logger.close()
    if trainer.step_times:
        summary["step_time_s_median"] = round(statistics.median(trainer.step_times), 5)
    # Peak resident memory of this process: the run's whole footprint, model and data included.
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
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


# ---------------------------------------------------------------- data, model, optimizer


def _checkpoint_state(path: Path | None) -> dict:
    """The loop state saved with a checkpoint (step, epoch, ...), or {} without one."""
    return {} if path is None else json.loads((path / "state.json").read_text())


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


def first_batches(batches, samples: int) -> list[dict]:
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
    from leantrain.optim.registry import OptimizerRequest
    from leantrain.optim.registry import build_optimizer as build_named

    try:
        ascent = _ascent(cfg, train, task)
        request = OptimizerRequest(o, model, params, steps_per_epoch, ascent, cfg.train.warmup_steps)
        return build_named(request, o.name)
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


def _param_counts(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total_params": total, "trainable_params": trainable, "trainable_pct": round(100 * trainable / total, 4)}
