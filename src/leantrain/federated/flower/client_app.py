"""The ClientApp: one of our algorithms' ``client_update`` behind Flower's ``@app.train()``.

Each train message is handled the way the simulator trains a client (``Simulator._client``): the model is
rebuilt as the simulator builds it (``model_fn()`` under ``torch.manual_seed(seed)``), the client's shard comes from
the same ``federated_data(dataset, partition, num_clients, seed)`` split (cached per process), its batches are
seeded with ``(seed, round, cid)`` and ``torch.manual_seed((seed, round, cid, 1))`` runs right before
``algorithm.client_update``. The reply is an ArrayRecord of the uploaded tensors and a MetricRecord of the
client's metrics plus the payload bytes it received and sent. Per-client state (``ClientContext.state``) lives in
Flower's ``context.state``, which the SuperNode keeps between the node's messages.

Deliberate departure from the simulator: a client commits its new state as soon as it has trained, since it cannot
know whether the server will accept the reply (the simulator keeps the state only of accepted replies).

A ``query`` message answers with the node's ``partition-id``: the strategy uses it to map Flower node ids onto
our client ids.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from leantrain.errors import ConfigError
from leantrain.federated.algorithms.base import ClientContext, train_client
from leantrain.federated.client import ClientData, LocalTraining
from leantrain.federated.clock import assign_profiles, profile
from leantrain.federated.flower.config import FlowerRunConfig, initial_model
from leantrain.federated.flower.records import (
    ARRAYS,
    METRICS,
    RECEIVED_BYTES,
    SENT_BYTES,
    STATE,
    MalformedMessageError,
    from_array_record,
    read_instruction,
    record_nbytes,
    to_array_record,
    to_metric_record,
)
from leantrain.federated.simulator import batch_seed, seed_for, seed_torch

PARTITION = "partition"  # MetricRecord key of a query reply


def node_partition(context: Context) -> tuple[int | None, int | None]:
    """``partition-id`` and ``num-partitions`` from the node config (None where absent)."""
    config = context.node_config
    pid, num = config.get("partition-id"), config.get("num-partitions")
    return (int(pid) if pid is not None else None), (int(num) if num is not None else None)


class LeantrainClient:
    """The ClientApp's logic on plain objects: ``train(message, context) -> reply`` and ``query(...)``.

    ``config``: the run's :class:`FlowerRunConfig` (None: read ``context.run_config`` on every message);
    ``model_fn``: builds the model (None: ``config.model_fn()``, a model from ``leantrain.models``).
    """

    def __init__(self, config: FlowerRunConfig | None = None, model_fn: Callable[[], nn.Module] | None = None):
        self.config = config
        self.model_fn = model_fn
        self._models: dict[str, nn.Module] = {}  # pristine initial model per run config (built once per process)
        self._client_data: dict[int, ClientData] = {}

    def run_config(self, context: Context) -> FlowerRunConfig:
        return self.config if self.config is not None else FlowerRunConfig.from_run_config(dict(context.run_config))

    def _model(self, config: FlowerRunConfig) -> nn.Module:
        key = repr(config.replace(result_path=""))
        if key not in self._models:
            self._models[key] = initial_model(self.model_fn or config.model_fn(), config.seed)
        return copy.deepcopy(self._models[key])

    def _data(self, config: FlowerRunConfig) -> ClientData:
        data = config.data()
        if id(data) not in self._client_data:
            self._client_data[id(data)] = ClientData(data.train, data.parts, data.unlabeled_parts)
        return self._client_data[id(data)]

    def train(self, message: Message, context: Context) -> Message:
        config = self.run_config(context)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        round_idx, cid, instruction = read_instruction(message.content)
        pid, _ = node_partition(context)
        if pid is not None and pid != cid:
            raise MalformedMessageError(f"this node holds partition {pid} but was sent client {cid}'s instruction")
        if not 0 <= cid < config.num_clients:
            raise ConfigError(f"client id {cid} is outside num_clients={config.num_clients}")
        client_data, model = self._data(config), self._model(config)
        algorithm = config.algorithm_instance()
        devices = [profile(n) for n in assign_profiles(config.num_clients, config.devices or None, config.seed)]
        algorithm.seed = config.seed
        algorithm.setup(model, config.num_clients, devices)
        local = LocalTraining(config.local_steps, config.batch_size, config.lr, config.momentum, config.weight_decay)
        state = from_array_record(context.state.array_records[STATE]) if STATE in context.state.array_records else {}
        from leantrain.train.tasks import ClassificationTask

        phases = tuple(algorithm.phases(round_idx))
        phase = instruction.config.get("phase", phases[0]) if len(phases) > 1 else phases[0]
        if phase not in phases:
            raise MalformedMessageError(f"instruction phase {phase!r} is not one of round {round_idx}'s {phases}")
        seed = batch_seed(config.seed, round_idx, cid, phases.index(phase))  # as the simulator seeds each phase
        batches = client_data.batches(cid, local.batch_size, seed)
        unlabeled = client_data.unlabeled_batches(cid, local.batch_size, seed_for(seed, 5))
        ctx = ClientContext(cid, round_idx, model, batches, client_data.num_samples(cid), local,
                            ClassificationTask().loss, devices[cid], state, unlabeled)  # fmt: skip
        seed_torch(seed_for(config.seed, round_idx, cid, 1))
        reply = train_client(algorithm, ctx, instruction)
        if ctx.state:
            context.state[STATE] = to_array_record(ctx.state)
        elif STATE in context.state.array_records:
            del context.state[STATE]  # as the simulator: an emptied state deletes the stored one
        arrays = to_array_record(reply.arrays)
        received = record_nbytes(message.content.array_records[ARRAYS])
        metrics = to_metric_record(reply.metrics, **{SENT_BYTES: record_nbytes(arrays), RECEIVED_BYTES: received})
        return Message(RecordDict({ARRAYS: arrays, METRICS: metrics}), reply_to=message)

    def query(self, message: Message, context: Context) -> Message:
        pid, num = node_partition(context)
        if pid is None:
            raise ConfigError('this SuperNode has no "partition-id" in its node config; start it with '
                              '--node-config "partition-id=<i> num-partitions=<n>"')  # fmt: skip
        record: dict[str, Any] = {"partition-id": pid}
        if num is not None:
            record["num-partitions"] = num
        return Message(RecordDict({PARTITION: MetricRecord(record)}), reply_to=message)


def make_client_app(
    config: FlowerRunConfig | None = None, model_fn: Callable[[], nn.Module] | None = None
) -> ClientApp:
    """A Flower ``ClientApp`` running our algorithm's client side.

    ``config`` fixes the run's settings (None: they come from ``context.run_config``, i.e. the app's
    ``[tool.flwr.app.config]`` and ``flwr run --run-config`` overrides); ``model_fn`` builds a custom model (None:
    ``leantrain.models.build_model(config.model, **config.model_options)``). Pass the same values to
    :func:`leantrain.federated.flower.make_server_app`.
    """
    client = LeantrainClient(config, model_fn)
    app = ClientApp()
    app.train()(client.train)
    app.query()(client.query)
    app.leantrain_client = client  # for tests and introspection
    return app
