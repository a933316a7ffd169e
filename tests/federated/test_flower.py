"""leantrain on Flower: the strategy and client app reproduce the Simulator exactly (global model, ledger bytes,
accuracy), records carry exactly the ledger's bytes, malformed replies are rejected as in the simulator, nodes map
to clients by partition-id, the app skeleton validates, and (slow) a real loopback deployment (SuperLink + 2
SuperNodes) and a simulation-engine run match the simulator and leave no process behind."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, MessageType, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from leantrain.errors import ConfigError  # noqa: E402
from leantrain.federated import Instruction, Reply, wire_nbytes  # noqa: E402
from leantrain.federated.comm import config_nbytes  # noqa: E402
from leantrain.federated.flower import (  # noqa: E402
    FlowerRunConfig,
    LeantrainStrategy,
    LocalDeployment,
    LocalSimulation,
    make_client_app,
    write_app,
)
from leantrain.federated.flower.deployment import is_running, stop_process_tree  # noqa: E402
from leantrain.federated.flower.records import (  # noqa: E402
    ALGORITHM_CONFIG,
    ARRAYS,
    METRICS,
    from_array_record,
    instruction_config,
    read_reply,
    to_array_record,
    to_metric_record,
)

# algorithm -> (module, options, local_steps)
ALGORITHMS = {
    "fedavg": ("fedavg", {}, 3),
    "fedluar": ("fedluar", {"recycled_layers": 1}, 3),
    "fedlama": ("fedlama", {"phi": 2}, 3),
    "fedpa": ("partial_averaging", {"groups": 3}, 1),
    "prism": ("prism", {"keep": 0.5, "decompose_linear": True}, 3),
}


def _needs(name):
    module = ALGORITHMS[name][0]
    if importlib.util.find_spec(f"leantrain.federated.algorithms.{module}") is None:
        pytest.skip(f"leantrain.federated.algorithms.{module} is not there yet")


def _config(name="fedavg", **kw):
    _, options, steps = ALGORITHMS[name]
    args = dict(algorithm=name, algorithm_options=options, num_clients=4, clients_per_round=2, rounds=4,
                local_steps=steps, batch_size=16, lr=0.3, model_options={"hidden_sizes": [32, 16]}, seed=3,
                torch_threads=1, node_wait_s=2.0)  # fmt: skip
    args.update(kw)
    return FlowerRunConfig(**args)


@pytest.fixture
def task_identity():
    """Messages need a run/node/task identity, which Flower's runtime sets; set one for in-process tests."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class InProcessGrid:
    """Flower's Grid without the runtime: each message goes straight to the ClientApp with its node's Context.

    Node ids are arbitrary and node i holds partition ``order[i]`` (not i), so the node -> client mapping matters.
    ``tamper(message, reply) -> reply`` may change replies on their way back.
    """

    def __init__(self, app, num_nodes, order=None, tamper=None, node_config=None):
        order = order or list(reversed(range(num_nodes)))
        self.app, self.tamper = app, tamper
        self.contexts = {}
        for i in range(num_nodes):
            config = {"partition-id": order[i], "num-partitions": num_nodes} if node_config is None else node_config(i)
            self.contexts[9000 + 13 * i] = Context(7, 9000 + 13 * i, config, RecordDict(), {})
        self.sent = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as err:  # Flower turns a ClientApp exception into an error reply
                reply = Message(Error(code=0, reason=str(err)), reply_to=msg)
            replies.append(self.tamper(msg, reply) if self.tamper else reply)  # src_node_id comes from msg
        return replies


def _flower_run(config, **grid_kw):
    strategy = LeantrainStrategy.from_config(config)
    grid = InProcessGrid(make_client_app(config), config.num_clients, **grid_kw)
    result = strategy.start(grid, num_rounds=config.rounds)
    return strategy, grid, result


# ------------------------------------------------------------------------------------------ records and config


def test_records_carry_exactly_the_ledger_bytes():
    arrays = {"w": torch.randn(5, 3), "b": torch.zeros(3), "i": torch.arange(4), "h": torch.ones(2, 2).bfloat16(),
              "scalar": torch.tensor(7)}  # fmt: skip
    record = to_array_record(arrays)
    for name, t in arrays.items():
        assert len(record[name].data) == wire_nbytes(t), name
    back = from_array_record(record)
    for name, t in arrays.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    config = {"recycled": [2, 0], "cut": 3}
    assert len(instruction_config(1, 2, Instruction({}, config))[ALGORITHM_CONFIG]) == config_nbytes(config)
    assert instruction_config(1, 2, Instruction({}, {}))[ALGORITHM_CONFIG] == ""
    metrics = to_metric_record({"loss": 0.5, "samples": 48, "flag": True, "nan": float("nan"), "name": "x"})
    assert dict(metrics) == {"loss": 0.5, "samples": 48, "flag": 1, "num-examples": 48}
    reply = read_reply(RecordDict({ARRAYS: record, METRICS: metrics}))
    assert set(reply.arrays) == set(arrays) and reply.metrics["samples"] == 48


def test_run_config_round_trips_and_rejects_bad_values():
    config = _config("fedluar", partition="dirichlet", partition_options={"alpha": 0.5}, devices={"weak": 0.5})
    table = config.to_run_config()
    assert all(isinstance(v, bool | int | float | str) for v in table.values())
    assert table["algorithm-options"] == '{"recycled_layers": 1}'
    assert FlowerRunConfig.from_run_config(table) == config
    with pytest.raises(ConfigError, match="unknown run-config key"):
        FlowerRunConfig.from_run_config({**table, "epochs": 3})
    with pytest.raises(ConfigError, match="not valid JSON"):
        FlowerRunConfig(algorithm_options="{recycled_layers: 1}")
    with pytest.raises(ConfigError, match="clients_per_round"):
        FlowerRunConfig(num_clients=2, clients_per_round=3)
    with pytest.raises(ConfigError, match="local_steps"):
        FlowerRunConfig(local_steps=0)


# ------------------------------------------------------------------------------------------ strategy + client app


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_flower_round_loop_reproduces_the_simulator(name, task_identity):
    _needs(name)
    config = _config(name)
    strategy, grid, result = _flower_run(config)
    sim = config.simulator()
    history = sim.run()
    for k, v in sim.algorithm.global_state.items():
        assert torch.equal(strategy.algorithm.global_state[k], v), k
    assert strategy.ledger.state_dict() == sim.ledger.state_dict()
    for ours, theirs in zip(strategy.rounds, history.rounds, strict=True):
        for key in ("cohort", "responded", "up_bytes", "down_bytes", "up_messages", "train_loss", "test_accuracy",
                    "test_loss"):  # fmt: skip
            assert ours[key] == theirs[key], (ours["round"], key)
        # what actually travelled in Flower's records: the server's arrays + config JSON, the clients' arrays
        assert ours["flower"]["down_bytes"] == ours["down_bytes"]
        assert ours["flower"]["up_bytes"] == ours["up_bytes"]
        assert ours["flower"]["client_sent_bytes"] == ours["up_bytes"]
        assert ours["flower"]["client_received_bytes"] <= ours["down_bytes"]
    final = from_array_record(result.arrays)
    for k, v in strategy.algorithm.eval_state().items():
        assert torch.equal(final[k], v), k
    # one message per sampled client, each to the node that holds that client's partition
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(train) == config.rounds * config.clients_per_round
    for m in train:
        cid = int(m.content.config_records["config"]["leantrain-cid"])
        assert grid.contexts[m.metadata.dst_node_id].node_config["partition-id"] == cid


def test_fedluar_on_flower_uploads_less_than_fedavg(task_identity):
    _needs("fedluar")
    luar, _, _ = _flower_run(_config("fedluar", rounds=3))
    avg, _, _ = _flower_run(_config("fedavg", rounds=3))
    assert luar.rounds[0]["up_bytes"] == avg.rounds[0]["up_bytes"]  # nothing recycled in round 0
    assert all(luar.rounds[r]["up_bytes"] < avg.rounds[r]["up_bytes"] for r in (1, 2))


def test_malformed_and_failed_replies_are_handled_as_in_the_simulator(task_identity):
    config = _config("fedavg", rounds=2)
    first = {}  # round -> the first client sent to (smallest cid, in both runtimes), whose reply is tampered

    def truncate(arrays):
        return {**arrays, "net.1.weight": arrays["net.1.weight"][:, :-1]}

    def tamper(msg, reply):
        if msg.metadata.message_type != MessageType.TRAIN or first.setdefault(msg.metadata.group_id, msg) is not msg:
            return reply
        arrays = truncate(from_array_record(reply.content.array_records[ARRAYS]))
        return Message(RecordDict({ARRAYS: to_array_record(arrays), METRICS: reply.content.metric_records[METRICS]}),
                       reply_to=msg)  # fmt: skip

    strategy, _, _ = _flower_run(config, tamper=tamper)
    hooked = {}
    sim = config.simulator(fault_hook=lambda r, cid, reply: Reply(truncate(reply.arrays), reply.metrics)
                           if hooked.setdefault(r, cid) == cid else reply)  # fmt: skip
    history = sim.run()
    for ours, theirs in zip(strategy.rounds, history.rounds, strict=True):
        assert ours["rejected"] == theirs["rejected"] == 1 and ours["responded"] == theirs["responded"] == 1
        assert ours["up_bytes"] == theirs["up_bytes"]
        assert any("rejected" in e and "shape" in e for e in ours["events"])
    for k, v in sim.algorithm.global_state.items():
        assert torch.equal(strategy.algorithm.global_state[k], v), k

    # a ClientApp that raises comes back as an error reply: counted as failed, the model stays
    config = config.replace(rounds=1, clients_per_round=4)

    def fail(msg, reply):
        return reply if msg.metadata.message_type != MessageType.TRAIN else Message(Error(1, "nan"), reply_to=msg)

    strategy = LeantrainStrategy.from_config(config)
    before = {k: v.clone() for k, v in strategy.algorithm.global_state.items()}
    strategy.start(InProcessGrid(make_client_app(config), 4, tamper=fail), num_rounds=1)
    row = strategy.rounds[0]
    assert row["failed"] == 4 and row["responded"] == 0 and row["up_messages"] == 0
    for k, v in before.items():
        assert torch.equal(strategy.algorithm.global_state[k], v), k


def test_nodes_map_to_clients_by_partition_id(task_identity):
    config = _config("fedavg", rounds=1)
    strategy = LeantrainStrategy.from_config(config)
    grid = InProcessGrid(make_client_app(config), 4, order=[2, 0, 3, 1])
    assert strategy.connect(grid) == {2: 9000, 0: 9013, 3: 9026, 1: 9039}

    strategy = LeantrainStrategy.from_config(config)
    grid = InProcessGrid(make_client_app(config), 4, order=[0, 1, 1, 2])
    with pytest.raises(ConfigError, match="both hold partition-id=1"):
        strategy.connect(grid)

    # a node without partition-id is left out; after node_wait_s the strategy samples from the others
    strategy = LeantrainStrategy.from_config(config.replace(node_wait_s=0.0))
    grid = InProcessGrid(make_client_app(config), 4, node_config=lambda i: {} if i == 0 else {"partition-id": i})
    assert sorted(strategy.connect(grid)) == [1, 2, 3]


def test_client_refuses_another_partitions_instruction(task_identity):
    config = _config("fedavg", rounds=1)
    client = make_client_app(config).leantrain_client
    strategy = LeantrainStrategy.from_config(config)
    strategy.cid_to_node = {c: 100 + c for c in range(4)}
    msg = list(strategy.configure_train(1, None, None, None))[0]
    wrong = Context(7, 100, {"partition-id": 3}, RecordDict(), {})
    with pytest.raises(Exception, match="holds partition 3"):
        client.train(msg, wrong)


# ------------------------------------------------------------------------------------------ app skeleton, processes


def test_write_app_writes_a_valid_flower_app(tmp_path):
    from flwr.cli.config_utils import load_and_validate

    app = write_app(tmp_path / "my-app", algorithm="fedluar", algorithm_options={"recycled_layers": 1}, rounds=5)
    config, _ = load_and_validate(app / "pyproject.toml", check_module=False)
    table = config["tool"]["flwr"]["app"]["config"]
    assert FlowerRunConfig.from_run_config(table) == FlowerRunConfig(
        algorithm="fedluar", algorithm_options={"recycled_layers": 1}, rounds=5
    )
    assert config["tool"]["flwr"]["app"]["components"] == {"serverapp": "leantrain_app.server_app:app",
                                                           "clientapp": "leantrain_app.client_app:app"}  # fmt: skip
    assert set(config["tool"]["flwr"]["federations"]) == {"default", "local-simulation", "local-deployment"}
    for module in ("server_app.py", "client_app.py"):
        compile((app / "leantrain_app" / module).read_text(), module, "exec")
    app = write_app(tmp_path / "b", partition="dirichlet", partition_options={"alpha": 0.3})
    table = load_and_validate(app / "pyproject.toml", check_module=False)[0]["tool"]["flwr"]["app"]["config"]
    assert json.loads(table["partition-options"]) == {"alpha": 0.3}
    with pytest.raises(ConfigError, match="exists"):
        write_app(app)
    with pytest.raises(ConfigError, match="rounds"):
        write_app(tmp_path / "bad", rounds=0)
    with pytest.raises(ConfigError, match="epochs"):
        write_app(tmp_path / "bad", epochs=3)


def test_stop_process_tree_reaches_detached_grandchildren():
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
            "print(p.pid, flush=True); time.sleep(60)")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = int(proc.stdout.readline())
    tree = stop_process_tree(proc, grace_s=3)
    proc.stdout.close()
    assert {pid for pid, _ in tree} >= {proc.pid, grandchild}
    assert not any(is_running(pid, started) for pid, started in tree)


# ------------------------------------------------------------------------------------------ real Flower runs (slow)


def _check_against_simulator(history, config):
    sim = config.simulator()
    expected = sim.run()
    assert history["status"] == "completed"
    assert history["ledger"] == json.loads(json.dumps(sim.ledger.state_dict()))
    for ours, theirs in zip(history["rounds"], expected.rounds, strict=True):
        assert ours["flower"]["down_bytes"] == ours["down_bytes"] == theirs["down_bytes"]  # what the server sent
        assert ours["flower"]["client_sent_bytes"] == ours["up_bytes"] == theirs["up_bytes"]  # what clients sent
        assert ours["responded"] == theirs["responded"] == config.clients_per_round
        assert ours["test_accuracy"] == theirs["test_accuracy"]
        assert ours["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-12)
    accuracies = [history["initial_eval"]["accuracy"]] + [row["test_accuracy"] for row in history["rounds"]]
    assert accuracies[-1] > accuracies[0] and accuracies == sorted(accuracies)  # accuracy rises


def _flower_algorithm():
    return "fedluar" if importlib.util.find_spec("leantrain.federated.algorithms.fedluar") else "fedavg"


def _write_real_app(tmp_path, name):
    config = _config(name, num_clients=2, clients_per_round=2, rounds=2, local_steps=8, lr=0.5,
                     model_options={"hidden_sizes": [32]}, node_wait_s=60.0, round_timeout_s=120.0)  # fmt: skip
    return config, write_app(tmp_path / "app", config)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["layer-wise", "prism"])  # prism: per-node sub-model slices and index lists
def test_deployment_on_loopback_matches_the_simulator_and_stops_every_process(tmp_path, name):
    config, app = _write_real_app(tmp_path, _flower_algorithm() if name == "layer-wise" else name)
    with LocalDeployment(2, flwr_home=tmp_path / "flwr-home") as flower:
        history = flower.run_app(app, timeout_s=300)
        assert flower.port is not None
    assert flower.stopped and not any(is_running(pid, started) for pid, started in flower.stopped)
    assert history["clients_to_nodes"].keys() == {"0", "1"}
    _check_against_simulator(history, config)
    if config.algorithm == "fedluar":  # round 1 recycles one kernel: less goes up than comes down
        assert history["rounds"][1]["up_bytes"] < history["rounds"][1]["down_bytes"]


@pytest.mark.slow
def test_simulation_engine_run_matches_the_simulator(tmp_path):
    config, app = _write_real_app(tmp_path, "fedavg")
    with LocalSimulation(2, flwr_home=tmp_path / "flwr-home") as flower:
        history = flower.run_app(app, timeout_s=300)
    assert flower.stopped and not any(is_running(pid, started) for pid, started in flower.stopped)
    _check_against_simulator(history, config)


def _object_npy() -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("garbage", ["bytes", "object-dtype", "wrong-keys", "no-records", "huge-update", "huge-claim"])
def test_a_reply_that_fails_to_decode_or_is_absurd_is_rejected_never_crashes_aggregate_train(garbage, task_identity):
    from flwr.app import Array, ArrayRecord, MetricRecord

    config = _config("fedavg", rounds=1, clients_per_round=4)
    victim = {}

    def tamper(msg, reply):
        if msg.metadata.message_type != MessageType.TRAIN or victim.setdefault("msg", msg) is not msg:
            return reply
        arrays = dict(reply.content.array_records[ARRAYS])
        metrics = reply.content.metric_records[METRICS]
        name = next(iter(arrays))
        if garbage == "bytes":
            arrays[name] = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"\x93NUMPY garbage")
        elif garbage == "object-dtype":
            arrays[name] = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=_object_npy())
        elif garbage == "wrong-keys":
            arrays = {"not.a.tensor": arrays[name]}
        elif garbage == "huge-update":
            arrays = dict(to_array_record({k: v * 1e30 for k, v in from_array_record(ArrayRecord(arrays)).items()}))
        elif garbage == "huge-claim":
            metrics = MetricRecord({**dict(metrics), "num_examples": 1e9})
        if garbage == "no-records":
            return Message(RecordDict({"something": MetricRecord({"a": 1})}), reply_to=msg)
        return Message(RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: metrics}), reply_to=msg)

    strategy, _, _ = _flower_run(config, tamper=tamper)
    row = strategy.rounds[0]
    if garbage == "huge-claim":  # accepted with its claim capped at the partition's size
        assert row["responded"] == 4 and any("capped to" in e for e in row["events"]), row["events"]
    else:
        assert row["rejected"] == 1 and row["responded"] == 3, row["events"]
    assert max(float(v.abs().max()) for v in strategy.algorithm.global_state.values()) < 1e3


@pytest.mark.parametrize("name", ["timelyfl", "fedbuff"])
def test_simulator_only_algorithms_are_refused_with_the_reason(name):
    from leantrain.errors import ConfigError
    from leantrain.federated import make_algorithm
    from leantrain.federated.flower.strategy import LeantrainStrategy

    with pytest.raises(ConfigError, match="does not run on Flower: .*(clock|asynchronous)"):
        LeantrainStrategy(make_algorithm(name), torch.nn.Sequential(torch.nn.Linear(6, 3)), 4, 2)


def test_kd_two_phase_rounds_on_flower_reproduce_the_simulator(task_identity):
    """On-device KD's rounds (aux FedAvg, then distillation on strong clients' unlabeled rows) as two exchanges per
    Flower round: the same models, ledger, cohorts and accuracies as the simulator."""
    from leantrain.federated.clock import assign_profiles

    holders = [c for c, n in enumerate(assign_profiles(4, {"weak": 0.5}, 3)) if n == "strong"]
    config = _config("fedavg", algorithm="kd", rounds=3, devices={"weak": 0.5},
                     algorithm_options={"aux_model": {"name": "mlp", "hidden_sizes": [8]}, "rampup_rounds": 2},
                     partition_options={"unlabeled_share": 0.3, "unlabeled_holders": holders})  # fmt: skip
    strategy, grid, _ = _flower_run(config)
    sim = config.simulator()
    history = sim.run()
    for k, v in sim.algorithm.global_state.items():
        assert torch.equal(strategy.algorithm.global_state[k], v), k
    assert strategy.ledger.state_dict() == sim.ledger.state_dict()
    for ours, theirs in zip(strategy.rounds, history.rounds, strict=True):
        for key in ("cohort", "responded", "up_bytes", "down_bytes", "train_loss", "test_accuracy"):
            assert ours[key] == theirs[key], (ours["round"], key)
        assert {p: v["cohort"] for p, v in ours["phases"].items()} == {"aux": 2, "target": len(holders)}
        assert ours["phases"]["target"]["responded"] == theirs["phases"]["target"]["responded"] == len(holders)
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(train) == config.rounds * (2 + len(holders))  # one message per client and phase
