"""The kinds of run a recipe can be, each handed to its area's runner through this registry.

A recipe is *supervised* (the plain training loop), *federated* (``federated.algorithm`` set: the simulator),
*marl* (``marl.env`` set: the value-decomposition runner), *sbc* (``sbc.population`` set: SBC's pipeline of
MARL runs, :mod:`leantrain.marl.sbc`) or *hetero* (``hetero.method`` set: local SGD across
devices of different speed). A kind names the config keys its recipes use (an
override of any other key is an error, see :mod:`leantrain.config`), the x axis of its metrics, the budget keys
a resumed run may raise, and its runner ``runner(cfg, run_dir, resume_from) -> summary`` as ``"module:function"``
(imported on use, so reading this registry stays cheap). Areas register their kind with :func:`register_run_kind`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

COMMON_KEYS = ("name", "seed", "threads", "output_dir", "resume", "progress", "log_formats")


@dataclass(frozen=True)
class RunKind:
    name: str
    runner: str  # "module:function", called as runner(cfg, run_dir, resume_from) -> summary dict
    uses: tuple[str, ...]  # what its recipes use besides COMMON_KEYS: whole sections ("train") or keys ("optim.lr")
    x_key: str  # the x axis of its metrics.jsonl records
    budget_keys: tuple[str, ...]  # what a resumed run may raise to train longer
    selector: str | None = None  # the config key whose being set makes a recipe this kind (None: the default)
    split: str | None = None  # the records `leantrain plot` draws by default (None: every record)
    splits: tuple[str, ...] = ()  # record splits a plotted metric name may be prefixed with
    progress: str = "steps"  # the report column for how far a run got
    summary_progress: str = "steps"  # the summary.json key holding that number
    resumable: bool = True  # whether its runs keep checkpoints that ``resume=RUN_DIR`` continues
    follower: str | None = None  # "module:function" a torchrun rank > 0 runs as follower(cfg, resume_from); None: one
    #                              process only (see leantrain.runs.follower)

    def load_runner(self) -> Callable:
        module, function = self.runner.split(":")
        return getattr(importlib.import_module(module), function)

    def load_follower(self) -> Callable | None:
        if self.follower is None:
            return None
        module, function = self.follower.split(":")
        return getattr(importlib.import_module(module), function)

    def uses_key(self, dotted: str) -> bool:
        """Whether a recipe of this kind reads the config key ``dotted`` (e.g. "optim.lr", "seed")."""
        if dotted in COMMON_KEYS or dotted == self.selector:
            return True
        return any(dotted == use or dotted.startswith(f"{use}.") for use in self.uses)

    def accepts_override(self, dotted: str) -> bool:
        """Keys a recipe of this kind may be given: the ones it reads, and the selectors that change its kind."""
        return self.uses_key(dotted) or any(k.selector == dotted for k in RUN_KINDS.values())


RUN_KINDS: dict[str, RunKind] = {}


def register_run_kind(kind: RunKind) -> RunKind:
    RUN_KINDS[kind.name] = kind
    return kind


register_run_kind(RunKind(
    "supervised", "leantrain.runs.supervised:run_supervised",
    ("task", "data", "model", "finetune", "optim", "train", "lowrank", "prune"), "step",
    ("train.epochs", "train.max_steps"), split="val", splits=("train", "val"),
))  # fmt: skip
register_run_kind(RunKind(
    "federated", "leantrain.federated.run:run_federated",
    ("data.dataset", "data.train_subset", "data.batch_size", "model", "optim.lr", "optim.momentum",
     "optim.weight_decay", "federated"), "round",
    ("federated.rounds", "federated.stop_after"), selector="federated.algorithm", progress="rounds",
    summary_progress="rounds_done", follower="leantrain.federated.run:torchrun_follower",
))  # fmt: skip
register_run_kind(RunKind(  # before marl: an SBC recipe sets marl.env too
    "sbc", "leantrain.marl.sbc:run_sbc", ("marl", "sbc"), "stage", (), selector="sbc.population",
    split="crossplay", splits=("job", "crossplay"), progress="stages", summary_progress="stages_done",
))  # fmt: skip
register_run_kind(RunKind(
    "marl", "leantrain.marl.run:run_marl", ("marl",), "t_env", ("marl.max_steps",), selector="marl.env",
    split="test", splits=("train", "test"), progress="t_env", summary_progress="t_env",
))  # fmt: skip
register_run_kind(RunKind(
    "hetero", "leantrain.hetero.run:run_hetero",
    ("data.dataset", "data.train_subset", "data.eval_subset", "data.batch_size", "model", "optim.lr",
     "optim.momentum", "optim.weight_decay", "hetero"), "time_s", ("hetero.time_budget_s", "hetero.epochs"),
    selector="hetero.method", progress="time_s", summary_progress="time_s", resumable=False,
    follower="leantrain.hetero.run:torchrun_follower",
))  # fmt: skip


def kind_of(cfg) -> RunKind:
    """The kind of a run config (a RunConfig, or the mapping of a config.yaml): the first kind whose selector key
    is set, else the default one."""
    for kind in RUN_KINDS.values():
        if kind.selector is not None:
            section, key = kind.selector.split(".")
            if isinstance(cfg, dict):
                value = (cfg.get(section) or {}).get(key)
            else:
                value = getattr(getattr(cfg, section), key)
            if value is not None:
                return kind
    return next(k for k in RUN_KINDS.values() if k.selector is None)


# One concept, one spelling per kind: an override of a key the kind ignores is answered with the key it uses.
SAME_CONCEPT: tuple[dict[str, str], ...] = (
    {
        "supervised": "train.max_steps",
        "federated": "federated.rounds",
        "marl": "marl.max_steps",
        "hetero": "hetero.time_budget_s",
    },
    {
        "supervised": "train.epochs",
        "federated": "federated.rounds",
        "marl": "marl.max_steps",
        "hetero": "hetero.epochs",
    },
    {"supervised": "optim.lr", "federated": "optim.lr", "marl": "marl.lr", "hetero": "optim.lr"},
    {"supervised": "optim.name", "marl": "marl.optimizer"},
    {
        "supervised": "train.eval_every",
        "federated": "federated.eval_every",
        "marl": "marl.eval_every",
        "hetero": "hetero.eval_every_s",
    },
    {
        "supervised": "train.checkpoint_every",
        "federated": "federated.checkpoint_every",
        "marl": "marl.checkpoint_every",
    },
    {"supervised": "train.log_every", "marl": "marl.log_every_episodes"},
    {"supervised": "train.grad_clip", "marl": "marl.grad_norm_clip"},
    {
        "supervised": "data.batch_size",
        "federated": "data.batch_size",
        "marl": "marl.batch_episodes",
        "hetero": "data.batch_size",
    },
)


def equivalent_key(dotted: str, kind: RunKind) -> str | None:
    """The key a ``kind`` recipe uses for the concept ``dotted`` names in another kind, if there is one."""
    for concept in SAME_CONCEPT:
        if dotted in concept.values() and kind.name in concept:
            return concept[kind.name]
    return None
