"""TimelyFL and the synchronous deadline machinery: the interval is the k-th smallest unit time, every planned
client meets it, workloads grow for fast clients and shrink to suffixes for slow ones (uploads and work follow),
identical devices reduce it to FedAvg exactly, deadline FedAvg drops exactly the clients slower than the interval;
availability and per-client lognormal profiles."""

import numpy as np
import pytest
import torch
from fl_fixtures import tiny_data
from torch import nn

from leantrain.errors import ConfigError
from leantrain.federated import FedAvg, Simulator, make_algorithm
from leantrain.federated.algorithms.timelyfl import TimelyFL
from leantrain.federated.clock import DeviceProfile, lognormal_profiles


def chain():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def sim(algorithm, devices=None, **kw):
    args = dict(num_clients=8, clients_per_round=8, rounds=2, local_steps=4, batch_size=4, lr=0.1,
                engine="sequential", seed=3, sample_time_s=0.05)  # fmt: skip
    args.update(kw)
    return Simulator(algorithm, chain, tiny_data(args["num_clients"]), devices=devices, **args)


def spread(n=8, seed=0):
    return lognormal_profiles(n, compute_sigma=1.0, bandwidth_sigma=0.5, seed=seed)


def test_interval_is_the_kth_unit_time_and_every_planned_client_meets_it():
    t = TimelyFL(aggregation_target=3)
    s = sim(t, spread())
    cohort = list(range(8))
    instructions = t.configure(0, cohort)
    times = sorted(t.unit_time(c) for c in cohort)
    assert t.deadline(0, cohort, instructions) == times[2]
    row = s.run().rounds[0]
    assert row["late"] == 0 and row["responded"] == len(instructions)
    assert row["round_time_s"] == pytest.approx(times[2])


def test_fast_clients_train_more_and_slow_ones_a_suffix():
    t = TimelyFL(aggregation_target=6, max_units=3)
    sim(t, spread())
    instructions = t.configure(0, list(range(8)))
    plans = t.plans
    deadline = t._deadline
    for cid, plan in plans.items():
        if plan is None:
            continue
        if t.unit_time(cid) <= deadline:  # full model, as many units as fit (at most max_units)
            assert plan["cut"] == 0 and plan["steps"] % 4 == 0
            units = plan["steps"] // 4
            assert units == 3 or t._time(cid, (units + 1) * 4, 0, t._config((units + 1) * 4, 0, 4)) > deadline
        else:  # a suffix, uploading only it
            assert plan["cut"] > 0
            assert set(t.expected_upload(0, cid, instructions[cid])) == set(t.suffix(plan["cut"]))
    assert any(p and p["cut"] > 0 for p in plans.values()) and any(p and p["steps"] > 4 for p in plans.values())


def test_identical_devices_reduce_to_fedavg_exactly():
    a, b = sim(TimelyFL(), None, rounds=3), sim(FedAvg(), None, rounds=3)
    ha, hb = a.run(), b.run()
    for k in b.algorithm.global_state:
        assert torch.equal(a.algorithm.global_state[k], b.algorithm.global_state[k])
    assert [r["up_bytes"] for r in ha.rounds] == [r["up_bytes"] for r in hb.rounds]


def test_deadline_fedavg_drops_exactly_the_slow_clients():
    t = TimelyFL(aggregation_target=3, adaptive=False)
    s = sim(t, spread(), rounds=1)
    times = {c: t.unit_time(c) for c in range(8)}
    row = s.run().rounds[0]
    threshold = sorted(times.values())[2]
    assert row["late"] == sum(v > threshold for v in times.values()) == 5
    assert row["responded"] == 3


def test_timely_participates_more_than_deadline_fedavg():
    rows = {}
    for adaptive in (True, False):
        rows[adaptive] = sim(TimelyFL(aggregation_target=2, adaptive=adaptive), spread(seed=1), rounds=3).run().rounds
    assert sum(r["responded"] for r in rows[True]) > sum(r["responded"] for r in rows[False])
    assert [r["round_time_s"] for r in rows[True]] == pytest.approx([r["round_time_s"] for r in rows[False]])


def test_availability_limits_the_cohort_to_online_clients():
    s = sim(FedAvg(), None, clients_per_round=8, availability=0.5, rounds=4)
    rows = s.run().rounds
    assert all(r["cohort"] == r["available"] < 8 for r in rows)
    assert s.available(0) == s.available(0) and s.available(0) != s.available(1)


def test_lognormal_profiles_spread_and_determinism():
    p = lognormal_profiles(1000, compute_sigma=1.0, bandwidth_sigma=1.0, seed=0)
    factors = np.array([d.compute_factor for d in p])
    assert 8 < np.quantile(factors, 0.95) / np.quantile(factors, 0.05) < 40
    assert lognormal_profiles(5, seed=2) == lognormal_profiles(5, seed=2)
    assert all(isinstance(d, DeviceProfile) and d.name.startswith("strong-") for d in p[:3])
    with pytest.raises(ConfigError):
        lognormal_profiles(3, compute_sigma=-1)


def test_bad_options_and_runtime():
    for bad in ({"aggregation_target": 0}, {"max_units": 0}, {"adaptive": "yes"}):
        with pytest.raises(ConfigError):
            make_algorithm("timelyfl", **bad)
    with pytest.raises(ConfigError, match="Simulator"):
        TimelyFL().setup(chain(), 4, [])
