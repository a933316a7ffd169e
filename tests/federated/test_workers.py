"""The workers engine: the LPT schedule, the tensor exchange format, and real worker processes (gloo) giving
bitwise the results of one process, with client state, dropouts, crashes and malformed replies."""

import json
import os
from pathlib import Path

import pytest
import torch
from fl_fixtures import tiny_data, tiny_model

from leantrain.errors import ConfigError, LeantrainError
from leantrain.federated import make_algorithm
from leantrain.federated.algorithms.base import Reply
from leantrain.federated.engines import ClientOutcome
from leantrain.federated.engines.workers import (
    WorkersEngine,
    decode_outcomes,
    encode_outcomes,
    follow,
    lpt_schedule,
)
from leantrain.federated.simulator import Simulator
from leantrain.process_group import launch

# ---------------------------------------------------------------------------- the schedule


def test_lpt_balances_known_costs_and_assigns_every_client_once():
    costs = [7, 7, 6, 6, 5, 5, 4, 4, 4]  # optimum 16/16/16 on 3 workers; LPT gets there
    owner = lpt_schedule(costs, 3)
    assert len(owner) == len(costs) and set(owner) == {0, 1, 2}
    loads = [sum(c for c, o in zip(costs, owner, strict=True) if o == w) for w in range(3)]
    assert max(loads) - min(loads) <= 4 and max(loads) <= 4 / 3 * sum(costs) / 3 + max(costs)
    assert lpt_schedule([1.0] * 10, 2).count(0) == 5
    # one heavy client goes alone; the rest fill the other worker
    assert lpt_schedule([10, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1]


def test_lpt_is_deterministic_and_tie_stable():
    costs = [3.0, 1.0, 3.0, 2.0, 2.0, 0.0, 1.0]
    assert lpt_schedule(costs, 3) == lpt_schedule(list(costs), 3)
    assert lpt_schedule([1.0, 1.0, 1.0, 1.0], 2) == [0, 1, 0, 1]
    assert lpt_schedule([], 2) == [] and lpt_schedule([5.0], 4) == [0]
    with pytest.raises(ConfigError):
        lpt_schedule([1.0], 0)


# ---------------------------------------------------------------------------- the exchange format


def test_outcomes_travel_exactly_as_tensors_and_json():
    nan = torch.tensor([1.0, float("nan"), -0.0])
    outcomes = [
        (ClientOutcome(3, Reply({"w": torch.randn(2, 3), "b": nan.to(torch.bfloat16), "n": torch.tensor(5)},
                                {"loss": 0.25, "samples": 8, "num_examples": 8, "flag": True, "t": torch.tensor(2.5)}),
                       state={"m": torch.arange(6, dtype=torch.float64).reshape(2, 3), "r": torch.tensor(4)}), 0.5),
        (ClientOutcome(7, why="dropped out"), 0.0),
        (ClientOutcome(9, why="ValueError: boom"), 0.125),
        (ClientOutcome(11, Reply({"w": torch.zeros(0)}, {"samples": float("inf")}), state={}), 1.0),
        (ClientOutcome(12, reply=None), 0.0),
        (ClientOutcome(13, reply={"not": "a reply"}), 0.0),
    ]  # fmt: skip
    blob = encode_outcomes(outcomes)
    assert blob.dtype == torch.uint8 and blob.ndim == 1
    back = decode_outcomes(blob.clone())
    assert [(o.cid, o.why, s) for o, s in back] == [(o.cid, o.why, s) for o, s in outcomes]
    a, b = outcomes[0][0], back[0][0]
    for name, t in a.reply.arrays.items():  # bitwise, NaN and -0.0 included
        u = b.reply.arrays[name]
        assert u.dtype == t.dtype and u.shape == t.shape
        assert torch.equal(u.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    metrics = b.reply.metrics
    assert metrics["flag"] is True and metrics["samples"] == 8 and type(metrics["loss"]) is float
    assert torch.equal(b.reply.metrics["t"], torch.tensor(2.5))
    assert all(torch.equal(b.state[k], a.state[k]) and b.state[k].dtype == a.state[k].dtype for k in a.state)
    assert back[1][0].reply is None and back[3][0].state == {} and back[3][0].reply.metrics["samples"] == float("inf")
    assert back[4][0].reply is None and back[4][0].state is None
    assert type(back[5][0].reply).__name__ == "dict" and not isinstance(back[5][0].reply, dict | Reply)
    assert b"pickle" not in bytes(blob.numpy()[:8])  # the header is JSON
    length = int.from_bytes(blob[:8].numpy().tobytes(), "little")
    json.loads(blob[8 : 8 + length].numpy().tobytes())


def test_a_corrupt_message_is_refused():
    blob = encode_outcomes([(ClientOutcome(1, Reply({"w": torch.ones(4)}, {})), 0.0)])
    with pytest.raises(LeantrainError, match="malformed"):
        decode_outcomes(blob[:-3])
    with pytest.raises(LeantrainError, match="malformed"):
        decode_outcomes(torch.zeros(20, dtype=torch.uint8))


# ---------------------------------------------------------------------------- real processes

SPEC = {"algorithm": ("fedpa", {"groups": 3}), "num_clients": 8, "clients_per_round": 5, "rounds": 4,
        "local_steps": 1, "dropout": 0.2, "failure": 0.2, "seed": 3}  # fmt: skip


def _tamper(r, cid, reply):
    """Round 1, client 2 (when it replies): a NaN; client 5: a wrong shape (rejected on every rank alike)."""
    if r == 1 and cid == 2 and isinstance(reply, Reply):
        name = next(iter(reply.arrays))
        reply.arrays[name] = reply.arrays[name] * float("nan")
    if cid == 5 and isinstance(reply, Reply):
        name = next(iter(reply.arrays))
        reply.arrays[name] = torch.zeros(1)
    return reply


def _misconfigured(r, cid, reply):
    if r == 1 and cid % 2 == 1:
        raise ConfigError("a client finds the run misconfigured")
    return reply


def _sim(spec, engine="sequential", **extra):
    name, options = spec["algorithm"]
    kw = {k: v for k, v in spec.items() if k not in ("algorithm", "tamper")}
    if spec.get("tamper"):
        kw["fault_hook"] = _misconfigured if spec["tamper"] == "config" else _tamper
    return Simulator(make_algorithm(name, **options), tiny_model, tiny_data(num_clients=spec["num_clients"]),
                     engine=engine, **kw, **extra)  # fmt: skip


def _follower(rank, size, spec):
    torch.manual_seed(1000 + rank)  # a different global RNG on each rank must not matter
    sim = _sim(spec, WorkersEngine())
    follow(sim)
    sim.run()


def _crasher(rank, size, spec):
    sim = _sim(spec, WorkersEngine())
    follow(sim)
    sim.run_round(0)
    os._exit(3)  # dies without a word in round 2


def _run_workers(spec, size=2, follower=_follower):
    with launch(follower, size, args=(spec,), label="federated worker"):
        sim = _sim(spec, WorkersEngine())
        history = sim.run()
    return sim, history


def _assert_same(a: Simulator, b: Simulator):
    sa, sb = a.algorithm.global_state, b.algorithm.global_state
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.client_states.keys() == b.client_states.keys()
    for cid, state in a.client_states.items():
        assert all(torch.equal(state[k], b.client_states[cid][k]) for k in state)
    strip = lambda rows: [{k: v for k, v in row.items() if k not in ("wall_s", "engine")} for row in rows]  # noqa: E731
    assert strip(a.history.rounds) == strip(b.history.rounds)
    assert a.ledger.state_dict() == b.ledger.state_dict()


@pytest.mark.parametrize("spec", [
    SPEC,
    {**SPEC, "algorithm": ("fedlama", {"phi": 2}), "local_steps": 2, "rounds": 5, "tamper": True,
     "devices": {"weak": 0.5}},
], ids=["fedpa-faults", "fedlama-tampered"])  # fmt: skip
def test_two_workers_give_bitwise_the_one_worker_result(spec):
    alone = _sim(spec)
    alone.run()
    sim, history = _run_workers(spec)
    _assert_same(alone, sim)
    events = [e for row in history.rounds for e in row["events"]]
    assert any("dropped out" in e for e in events) and any("failed" in e for e in events)
    if spec.get("tamper"):
        assert any("rejected" in e for e in events)
    assert sim.engine.last_assignment and set(sim.engine.last_assignment.values()) <= {0, 1}


def test_a_dying_worker_is_one_clear_error():
    with pytest.raises(LeantrainError, match=r"^federated worker 1 failed: exited with code 3$"):
        _run_workers({**SPEC, "dropout": 0.0, "failure": 0.0}, follower=_crasher)


def test_a_configuration_error_on_any_worker_stops_every_rank_with_it():
    spec = {**SPEC, "dropout": 0.0, "failure": 0.0, "tamper": "config", "rounds": 3}
    with pytest.raises(ConfigError, match="^a client finds the run misconfigured$"):
        _sim(spec).run()
    with pytest.raises(ConfigError, match="^a client finds the run misconfigured$"):
        _run_workers(spec)


def test_leantrain_run_with_two_workers_writes_the_one_worker_run_folder(tmp_path):
    from leantrain.config import resolve
    from leantrain.runs.launch import run

    base = ["data.dataset=digits", "federated.num_clients=6", "federated.clients_per_round=4", "threads=1",
            "federated.rounds=3", "federated.local_steps=2", "federated.eval_every=2", "progress=none",
            "federated.client_dropout=0.2", "federated.engine=sequential", f"output_dir={tmp_path}"]  # fmt: skip
    one = run(resolve("fedluar-fashion-mnist", base))
    two = run(resolve("fedluar-fashion-mnist", [*base, "federated.workers=2"]))
    assert two.summary["status"] == "completed" and two.summary["workers"] == 2 and one.summary["workers"] == 1
    assert one.summary["final"] == two.summary["final"] and one.summary["totals"] == two.summary["totals"]
    rows = [[{k: v for k, v in json.loads(line).items() if k not in ("wall_s", "engine")}
             for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()] for r in (one, two)]  # fmt: skip
    assert rows[0] == rows[1] and len(rows[0]) == 3
    names = [sorted(p.name for p in (r.run_dir / "checkpoints").iterdir()) for r in (one, two)]
    assert names[0] == names[1]
    assert len(list(tmp_path.iterdir())) == 2  # the workers opened no run folder of their own


@pytest.mark.slow
def test_torchrun_runs_the_same_federated_run(tmp_path):
    import subprocess
    import sys

    from leantrain.config import resolve
    from leantrain.runs.launch import run

    base = ["data.dataset=digits", "federated.num_clients=6", "federated.clients_per_round=4", "threads=1",
            "federated.rounds=3", "federated.local_steps=2", "progress=none", "federated.client_failure=0.2",
            "federated.engine=sequential"]  # fmt: skip
    one = run(resolve("fedavg-fashion-mnist", [*base, f"output_dir={tmp_path / 'one'}"]))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "leantrain", "run", "fedavg-fashion-mnist",
           *base, f"output_dir={tmp_path / 'two'}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (two,) = (tmp_path / "two").iterdir()  # one run folder: rank 0's
    summary = json.loads((two / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["final"] == one.summary["final"]
    assert summary["totals"] == one.summary["totals"]
