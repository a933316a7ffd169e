"""FedBuff on the event queue: time order and ties, staleness (a slow client's update is stale and down-weighted by
1/sqrt(1+τ)), the buffer's arithmetic, the clock follows arrivals, and a resumed run continues the same events."""

import math

import pytest
import torch
from fl_fixtures import tiny_data, tiny_model

from leantrain.errors import ConfigError
from leantrain.federated import Simulator, make_algorithm
from leantrain.federated.algorithms.fedbuff import FedBuff
from leantrain.federated.clock import EventQueue, profile


def test_event_queue_orders_by_time_then_push_order():
    q = EventQueue()
    for t, e in ((2.0, "c"), (1.0, "a"), (1.0, "b"), (0.5, "z")):
        q.push(t, e)
    assert q.events() == ["z", "a", "b", "c"]
    out = [q.pop() for _ in range(4)]
    assert out == [(0.5, "z"), (1.0, "a"), (1.0, "b"), (2.0, "c")] and len(q) == 0
    q.push(3.0, "x")
    state = q.state_dict()
    r = EventQueue()
    r.load_state_dict(state)
    assert r.pop() == (3.0, "x")


def two_speed_devices(n):
    fast, slow = profile("strong"), profile("weak")
    return [fast if c % 2 == 0 else slow for c in range(n)]


def fedbuff_sim(algorithm, **kw):
    args = dict(num_clients=4, clients_per_round=2, rounds=4, local_steps=3, batch_size=6, lr=0.1,
                engine="sequential", seed=0, devices=two_speed_devices(4))  # fmt: skip
    args.update(kw)
    return Simulator(algorithm, tiny_model, tiny_data(args["num_clients"]), **args)


def test_slow_updates_are_stale_and_the_clock_follows_arrivals():
    s = fedbuff_sim(FedBuff(buffer_size=1))
    rows = s.run().rounds
    times = [r["sim_time_s"] for r in rows]
    assert times == sorted(times) and times[0] > 0
    assert all(r["responded"] == 1 for r in rows)
    assert max(r["staleness_max"] for r in rows) >= 1  # a weak client's update arrives after fast ones were applied
    assert rows[0]["staleness_max"] == 0


def test_buffer_applies_staleness_weighted_mean_of_updates():
    fb = FedBuff(buffer_size=2, server_lr=0.5)
    s = fedbuff_sim(fb, rounds=1)
    before = {k: v.clone() for k, v in fb.global_state.items()}
    fb.dispatched = {0: 0, 1: 0}
    fb.version = 3  # client 0 is 3 updates stale, client 1 as well
    from leantrain.federated.algorithms.base import Reply

    d0 = {k: torch.ones_like(v) for k, v in before.items()}
    d1 = {k: 3 * torch.ones_like(v) for k, v in before.items()}
    fb.accumulate(0, 0, Reply(d0, {"num_examples": 5}))
    fb.accumulate(0, 1, Reply(d1, {"num_examples": 5}))
    fb.aggregate(0)
    expected = 0.5 * (1 + 3) / math.sqrt(4) / 2
    for k, v in fb.global_state.items():
        assert torch.allclose(v - before[k], torch.full_like(v, expected))
    assert fb.version == 4 and s is not None


def test_resume_continues_the_same_events(tmp_path):
    straight = fedbuff_sim(FedBuff(buffer_size=1), rounds=5).run()
    first = fedbuff_sim(FedBuff(buffer_size=1), rounds=5, checkpoint_dir=tmp_path)
    first.run(stop_after=2)
    resumed = fedbuff_sim(FedBuff(buffer_size=1), rounds=5, checkpoint_dir=tmp_path)
    history = resumed.run(resume=True)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]

    assert strip(history.rounds) == strip(straight.rounds)


def test_bad_options():
    for bad in ({"buffer_size": 0}, {"server_lr": 0}, {"staleness": "linear"}):
        with pytest.raises(ConfigError):
            make_algorithm("fedbuff", **bad)
