"""Partial model averaging: groups=1 == FedAvg(local_steps=1), one client == centralized SGD with persistent
momentum, the group partition, one averaging per tensor per τ rounds, FedAvg(τ)'s bytes with τ× the messages,
fixed cohorts within a block, exact mid-block resume, bad options."""

import itertools
import random

import pytest
import torch
from fl_fixtures import tiny_data, tiny_model
from torch import nn

from leantrain.errors import ConfigError
from leantrain.federated import FedAvg, Simulator, make_algorithm
from leantrain.federated.algorithms.base import communicated
from leantrain.federated.algorithms.partial_averaging import PartialAveraging, _tensor_units, balanced_groups
from leantrain.federated.simulator import seed_for
from leantrain.models import build_model


def bn_model():
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3))  # fmt: skip


def _sim(algorithm, model_fn=tiny_model, **kw):
    args = dict(
        num_clients=4, clients_per_round=4, rounds=6, local_steps=1, batch_size=8, lr=0.1, engine="sequential"
    )  # bitwise comparisons
    args.update(kw)
    return Simulator(algorithm, model_fn, tiny_data(args["num_clients"]), **args)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "engine")} for r in rows]  # timing, not results


def test_one_group_equals_fedavg_with_one_local_step():
    kw = dict(clients_per_round=2, rounds=6, seed=3, weight_decay=1e-3)
    fedavg, pa = _sim(FedAvg(), **kw), _sim(make_algorithm("fedpa", groups=1), **kw)
    h_fedavg, h_pa = fedavg.run(), pa.run()
    for k, v in fedavg.algorithm.global_state.items():
        assert torch.equal(v, pa.algorithm.global_state[k]), k
    assert _strip(h_pa.rounds) == _strip(h_fedavg.rounds)  # same losses, accuracies and bytes


def test_one_client_equals_centralized_sgd_with_persistent_momentum():
    data = tiny_data(num_clients=1, per_client=40)
    sim = Simulator(PartialAveraging(groups=2), tiny_model, data, num_clients=1, clients_per_round=1, rounds=6,
                    local_steps=1, batch_size=8, lr=0.1, momentum=0.9, seed=5)  # fmt: skip
    reference = tiny_model()
    reference.load_state_dict(sim.model.state_dict())
    sim.run()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)  # one optimizer: buffers persist
    for r in range(6):
        batch = next(sim.client_data.batches(0, 8, seed_for(5, r, 0)))
        opt.zero_grad()
        nn.functional.cross_entropy(reference(batch["x"]), batch["labels"]).backward()
        opt.step()
    local = {k[len("local.") :]: v for k, v in sim.client_states[0].items() if k.startswith("local.")}
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(local[name], value, rtol=0, atol=1e-6)
    assert any(k.startswith("momentum.") for k in sim.client_states[0])


@pytest.mark.parametrize("model_fn", [tiny_model, bn_model, lambda: build_model("cnn", input_shape=(1, 8, 8))])
def test_groups_partition_the_tensors_in_order_and_balanced(model_fn):
    model = model_fn()
    names = list(communicated(model.state_dict()))
    params = dict(model.named_parameters())
    for k in range(1, len(params) + 1):
        alg = PartialAveraging(groups=k)
        alg.setup(model, 4, [])
        groups = alg.partition
        assert len(groups) == k and all(groups)
        assert list(itertools.chain(*groups)) == names  # disjoint, covering, contiguous in forward order
        total = sum(model.state_dict()[n].numel() for n in names)
        unit = max(sum(model.state_dict()[n].numel() for n in u) for u in _tensor_units(model.state_dict(), model))
        assert max(alg.group_numel) <= total / k + unit  # a parameter with its buffers is never split
        assert alg.imbalance == max(alg.group_numel) / (total / k) >= 1
        for g in groups:  # BatchNorm statistics travel with their layer
            for n in g:
                if n.endswith("running_mean"):
                    assert n.replace("running_mean", "bias") in g and n.replace("mean", "var") in g


def test_balanced_groups_minimize_the_largest_group():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        sizes = [rng.randint(1, 100) for _ in range(n)]
        groups = balanced_groups([str(i) for i in range(n)], sizes, k)
        totals = [sum(sizes[int(i)] for i in g) for g in groups]
        best = min(max(sum(sizes[a:b]) for a, b in zip((0, *c), (*c, n), strict=True))
                   for c in itertools.combinations(range(1, n), k - 1))  # fmt: skip
        assert len(groups) == k and max(totals) == best
    assert balanced_groups(list("abcd"), [48, 8, 24, 3], 3) == [["a"], ["b"], ["c", "d"]]  # spread, not [b, c], [d]


def test_each_tensor_is_averaged_exactly_once_per_tau_rounds():
    tau = 3
    sim = _sim(PartialAveraging(groups=tau), model_fn=bn_model, clients_per_round=3)
    alg = sim.algorithm
    for r in range(2 * tau):
        before = {k: v.clone() for k, v in alg.global_state.items()}
        sim.run_round(r)
        changed = {k for k, v in alg.global_state.items() if not torch.equal(v, before[k])}
        assert changed == set(alg.group(r))  # exactly the due group moved (every tensor of it changes here)
    assert dict(sim.ledger.tensor_uploads) == {k: 2 * 3 for k in communicated(alg.global_state)}


def test_bytes_per_tau_rounds_equal_fedavg_and_messages_are_tau_times():
    tau, blocks = 3, 3
    pa = _sim(PartialAveraging(groups=tau), rounds=tau * blocks)
    fedavg = _sim(FedAvg(), rounds=blocks, local_steps=tau)
    h_pa, h_fedavg = pa.run(), fedavg.run()
    up = h_fedavg.rounds[0]["up_bytes"]
    for b in range(blocks):
        rows = h_pa.rounds[b * tau : (b + 1) * tau]
        assert sum(r["up_bytes"] for r in rows) == up == h_fedavg.rounds[b]["up_bytes"]
        assert sum(r["up_messages"] for r in rows) == tau * h_fedavg.rounds[b]["up_messages"]
        if b > 0:  # after the first full download, each block sends every tensor down once per client
            assert sum(r["down_bytes"] for r in rows) == h_fedavg.rounds[b]["down_bytes"]
    assert h_pa.totals["up_bytes"] == h_fedavg.totals["up_bytes"]
    assert h_pa.totals["up_params"] == h_fedavg.totals["up_params"]
    assert h_pa.totals["down_messages"] == tau * h_fedavg.totals["down_messages"]


def test_cohort_is_fixed_within_a_block_and_newcomers_get_the_full_model():
    seen = {}

    def spy(r, cid, reply):
        seen.setdefault(r, set()).add(cid)
        return reply

    tau = 3
    sim = _sim(PartialAveraging(groups=tau), num_clients=8, clients_per_round=3, rounds=4 * tau, fault_hook=spy)
    history = sim.run()
    blocks = [[seen[b * tau + k] for k in range(tau)] for b in range(4)]
    assert all(block[0] == block[1] == block[2] and len(block[0]) == 3 for block in blocks)
    assert len({frozenset(block[0]) for block in blocks}) > 1  # re-sampled between blocks
    full, last_group = sum(sim.algorithm.group_numel), sim.algorithm.group_numel[-1]
    for b in range(1, 4):  # at a block start, staying clients get the last averaged group, newcomers the model
        newcomers = len(blocks[b][0] - blocks[b - 1][0])
        assert history.rounds[b * tau]["down_params"] == (3 - newcomers) * last_group + newcomers * full


def test_resume_mid_block_continues_to_the_same_result(tmp_path):
    kw = dict(num_clients=6, clients_per_round=3, momentum=0.9, dropout=0.2, seed=4, model_fn=bn_model)
    straight = _sim(PartialAveraging(groups=3), rounds=8, **kw)
    full = straight.run()
    _sim(PartialAveraging(groups=3), rounds=4, checkpoint_dir=tmp_path, **kw).run()  # stops inside block 1
    resumed = _sim(PartialAveraging(groups=3), rounds=8, checkpoint_dir=tmp_path, **kw)
    history = resumed.run(resume=True)
    assert _strip(history.rounds) == _strip(full.rounds)
    for k, v in straight.algorithm.global_state.items():
        assert torch.equal(v, resumed.algorithm.global_state[k])
    assert straight.client_states.keys() == resumed.client_states.keys()
    for cid, state in straight.client_states.items():
        assert all(torch.equal(v, resumed.client_states[cid][k]) for k, v in state.items())


def test_bad_options_raise_config_errors_naming_them():
    for bad in (0, -2, 2.5, True, "8"):
        with pytest.raises(ConfigError, match="groups"):
            PartialAveraging(groups=bad)
    with pytest.raises(ConfigError, match="groups=5"):
        _sim(PartialAveraging(groups=5))  # the tiny model has 4 tensors
    with pytest.raises(ConfigError, match="weighting"):
        make_algorithm("fedpa", weighting="by-vibes")
    with pytest.raises(ConfigError, match="local_steps"):
        _sim(PartialAveraging(groups=2), local_steps=3).run()
