"""One run's settings, shared by the ServerApp, every ClientApp and the equivalent in-process Simulator.

Flower hands every app the same ``context.run_config`` (the ``[tool.flwr.app.config]`` table of the app's
``pyproject.toml`` plus ``flwr run --run-config`` overrides). :class:`FlowerRunConfig` is that table as a validated
dataclass: both sides rebuild the same algorithm (``make_algorithm(name, **options)``), the same model (built under
``torch.manual_seed(seed)``, exactly as the simulator does) and the same data partition (``federated_data`` with
the same dataset, partition, number of clients and seed). :meth:`FlowerRunConfig.simulator` builds the Simulator
that a Flower run must reproduce, which is what the tests compare against.

Run-config values are flat scalars, so the option dicts travel as JSON strings
(``algorithm-options = '{"recycled_layers": 1}'``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.federated.simulator import FederatedData, Simulator, federated_data

_DICT_FIELDS = ("algorithm_options", "model_options", "partition_options", "devices")


@dataclass
class FlowerRunConfig:
    """The run config of a leantrain Flower app (keys in ``pyproject.toml`` are these names with ``-``)."""

    algorithm: str = field(default="fedavg", metadata={"help": "federated algorithm name (make_algorithm)"})
    algorithm_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "algorithm keyword options"})
    model: str = field(default="mlp", metadata={"help": "model name in leantrain.models (build_model)"})
    model_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "model config overrides; input_shape/num_classes come from the data"}
    )
    dataset: str = field(default="digits", metadata={"help": "offline dataset name (leantrain.data)"})
    partition: str = field(default="iid", metadata={"help": "iid, dirichlet or shards"})
    partition_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "e.g. {'alpha': 0.5}"})
    train_subset: int = field(default=0, metadata={"help": "keep n training rows (0: all)"})
    num_clients: int = field(default=2, metadata={"help": "partitions = SuperNodes (one client id per node)"})
    clients_per_round: int = field(default=2, metadata={"help": "cohort size per round"})
    rounds: int = field(default=3, metadata={"help": "federated rounds"})
    local_steps: int = field(default=10, metadata={"help": "local SGD steps per round (tau)"})
    batch_size: int = field(default=32, metadata={"help": "local batch size"})
    lr: float = field(default=0.05, metadata={"help": "local SGD learning rate"})
    momentum: float = field(default=0.0, metadata={"help": "local SGD momentum"})
    weight_decay: float = field(default=0.0, metadata={"help": "local SGD weight decay"})
    devices: dict[str, float] = field(default_factory=dict, metadata={"help": "device profile shares"})
    seed: int = field(default=0, metadata={"help": "seeds the model, data split, cohorts and client batches"})
    eval_batch_size: int = field(default=1000, metadata={"help": "server-side evaluation batch size"})
    result_path: str = field(default="", metadata={"help": "the ServerApp writes its history JSON here"})
    node_wait_s: float = field(default=120.0, metadata={"help": "how long the ServerApp waits for the nodes"})
    round_timeout_s: float = field(default=600.0, metadata={"help": "how long a round waits for replies"})
    torch_threads: int = field(
        default=0, metadata={"help": "torch threads per ClientApp and for the ServerApp (0: torch's default)"}
    )

    def __post_init__(self) -> None:
        for name in _DICT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                value = _json_dict(name, value)
            if not isinstance(value, dict):
                raise ConfigError(f"FlowerRunConfig {name}={value!r} is invalid; expected a dict (or a JSON object)")
            setattr(self, name, dict(value))
        for name in ("num_clients", "clients_per_round", "rounds", "local_steps", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"FlowerRunConfig {name}={value!r} is invalid; expected an integer >= 1")
        for name in ("train_subset", "torch_threads", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"FlowerRunConfig {name}={value!r} is invalid; expected an integer >= 0")
        if self.clients_per_round > self.num_clients:
            raise ConfigError(f"clients_per_round={self.clients_per_round} exceeds num_clients={self.num_clients}")
        for name in ("lr", "momentum", "weight_decay", "node_wait_s", "round_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"FlowerRunConfig {name}={value!r} is invalid; expected a number")
            setattr(self, name, float(value))

    # ------------------------------------------------------------------ Flower run config <-> dataclass

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> FlowerRunConfig:
        """Read Flower's ``context.run_config`` (kebab-case keys; unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key.replace("-", "_"): value for key, value in run_config.items()}
        unknown = [key for key in run_config if key.replace("-", "_") not in names]
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {sorted(unknown)}; valid keys: {sorted(cls.run_config_keys())}"
            )
        return cls(**values)

    @classmethod
    def run_config_keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """The flat ``[tool.flwr.app.config]`` table (dicts as compact JSON strings)."""
        out: dict[str, bool | int | float | str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = json.dumps(value, sort_keys=True) if f.name in _DICT_FIELDS else value
        return out

    def replace(self, **changes: Any) -> FlowerRunConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ what both sides build from it

    def data(self) -> FederatedData:
        """The federated data the simulator would build (cached per process: ClientApps run many messages)."""
        return _cached_data(self.dataset, self.partition, self.num_clients, self.seed, self.train_subset or None,
                            json.dumps(self.partition_options, sort_keys=True))  # fmt: skip

    def model_fn(self, data: FederatedData | None = None) -> Callable[[], nn.Module]:
        """``build_model(model, **model_options)`` with input shape and class count taken from the data."""
        from leantrain.models import build_model, model_config_class

        data = data or self.data()
        options = dict(self.model_options)
        fields = {f.name for f in dataclasses.fields(model_config_class(self.model))}
        if "input_shape" in fields and data.input_shape is not None:
            options.setdefault("input_shape", tuple(data.input_shape))
        if "num_classes" in fields and data.num_classes is not None:
            options.setdefault("num_classes", data.num_classes)
        return lambda: build_model(self.model, **options)

    def algorithm_instance(self):
        from leantrain.federated.algorithms import make_algorithm

        return make_algorithm(self.algorithm, **self.algorithm_options)

    def simulator(self, model_fn: Callable[[], nn.Module] | None = None, **overrides: Any) -> Simulator:
        """The in-process Simulator running the same configuration (what a Flower run must reproduce, bitwise: its
        clients train one after another as Flower's ClientApps do, so the engine is sequential unless overridden)."""
        data = self.data()
        kwargs: dict[str, Any] = dict(
            num_clients=self.num_clients, clients_per_round=self.clients_per_round, rounds=self.rounds,
            local_steps=self.local_steps, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
            weight_decay=self.weight_decay, devices=self.devices or None, eval_batch_size=self.eval_batch_size,
            seed=self.seed, engine="sequential",
        )  # fmt: skip
        kwargs.update(overrides)
        return Simulator(self.algorithm_instance(), model_fn or self.model_fn(data), data, **kwargs)


def initial_model(model_fn: Callable[[], nn.Module], seed: int) -> nn.Module:
    """The model as the simulator builds it: ``model_fn()`` under ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return model_fn()


@lru_cache(maxsize=4)
def _cached_data(dataset: str, partition: str, num_clients: int, seed: int, train_subset: int | None,
                 partition_options: str) -> FederatedData:  # fmt: skip
    return federated_data(dataset, partition, num_clients, seed, train_subset, **json.loads(partition_options))


def _json_dict(name: str, text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"FlowerRunConfig {name}={text!r} is not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"FlowerRunConfig {name}={text!r} is invalid; expected a JSON object")
    return value
