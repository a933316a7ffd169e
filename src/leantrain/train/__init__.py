"""The small explicit training loop, its tasks, checkpoints, metric loggers and the recipe runner."""

from leantrain.train.checkpoint import load_checkpoint, save_checkpoint
from leantrain.train.loop import LoopState, Trainer, TrainingInterrupted
from leantrain.train.metric_loggers import CsvLogger, JsonlLogger, read_jsonl
from leantrain.train.schedule import lr_factor
from leantrain.train.tasks import ClassificationTask, LanguageModelingTask

__all__ = [
    "ClassificationTask",
    "CsvLogger",
    "JsonlLogger",
    "LanguageModelingTask",
    "LoopState",
    "Trainer",
    "TrainingInterrupted",
    "load_checkpoint",
    "lr_factor",
    "read_jsonl",
    "save_checkpoint",
]
