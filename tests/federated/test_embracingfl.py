"""EmbracingFL: all-strong == FedAvg, blocks (residual blocks whole), weak clients upload only their suffix (reply keys
and ledger bytes), the frozen prefix and its BatchNorm statistics stay put, the server keeps what nobody trained,
the memory estimate is monotone and the chosen cut fits, bad options."""

import pytest
import torch
from fl_fixtures import tiny_data
from torch import nn

from leantrain.errors import ConfigError
from leantrain.federated import ClientContext, FedAvg, Simulator, make_algorithm, wire_nbytes
from leantrain.federated.algorithms.base import communicated
from leantrain.federated.algorithms.embracingfl import EmbracingFL
from leantrain.federated.blocks import model_blocks
from leantrain.federated.clock import profile
from leantrain.federated.comm import config_nbytes
from leantrain.models import build_model


def bn_model():
    """Three blocks: [Linear, BN, ReLU], [Linear, BN, ReLU], [Linear]."""
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, 3))  # fmt: skip


def _sim(algorithm, **kw):
    args = dict(
        num_clients=4, clients_per_round=4, rounds=2, local_steps=3, batch_size=8, lr=0.1, engine="sequential"
    )  # bitwise comparisons
    args.update(kw)
    return Simulator(algorithm, bn_model, tiny_data(args["num_clients"]), **args)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "engine")} for r in rows]  # timing, not results


def test_all_strong_equals_fedavg_exactly():
    kw = dict(clients_per_round=2, rounds=3, momentum=0.9, weight_decay=1e-3, seed=2)
    fedavg, embracing = _sim(FedAvg(), **kw), _sim(make_algorithm("embracingfl"), **kw)
    h_fedavg, h_embracing = fedavg.run(), embracing.run()
    for k, v in fedavg.algorithm.global_state.items():
        assert torch.equal(v, embracing.algorithm.global_state[k]), k
    assert _strip(h_embracing.rounds) == _strip(h_fedavg.rounds)  # losses, accuracy, bytes and simulated time


def test_blocks_follow_the_model_and_never_split_a_residual_block():
    resnet = build_model("resnet20", input_shape=(1, 8, 8))
    alg = EmbracingFL()
    alg.setup(resnet, 1, [profile("strong")])
    residual = [[f"blocks.{i}"] for i in range(9)]
    assert [b.modules for b in alg.blocks] == [["stem.0", "stem.1", "stem.2"], *residual, ["head"]]
    assert sorted(t for b in alg.blocks for t in b.tensors) == sorted(resnet.state_dict())
    assert alg.blocks[1].activation_bytes > alg.blocks[9].activation_bytes > 0  # feature maps shrink with depth
    cnn = build_model("cnn", input_shape=(1, 8, 8))
    assert [b.modules for b in model_blocks(cnn)] == [
        ["features.0", "features.1", "features.2"], ["features.3", "features.4", "features.5", "classifier.0"],
        ["classifier.1", "classifier.2", "classifier.3"], ["classifier.4"]]  # fmt: skip
    assert [b.tensors for b in model_blocks(bn_model())] == [
        ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"],
        ["3.weight", "3.bias", "4.weight", "4.bias", "4.running_mean", "4.running_var", "4.num_batches_tracked"],
        ["6.weight", "6.bias"]]  # fmt: skip


def test_weak_clients_upload_only_their_suffix():
    replies = {}

    def spy(r, cid, reply):
        replies[(r, cid)] = reply
        return reply

    sim = _sim(EmbracingFL(cuts={"weak": 2, "moderate": 1}), devices={"weak": 0.5, "moderate": 0.25}, fault_hook=spy)
    history = sim.run()
    alg = sim.algorithm
    names = list(communicated(alg.global_state))
    expected = {"strong": names, "moderate": [n for n in names if n[0] in "3456"], "weak": ["6.weight", "6.bias"]}
    assert sorted(sim.device_names) == ["moderate", "strong", "weak", "weak"]
    for (_, cid), reply in replies.items():
        kind = sim.device_names[cid]
        assert list(reply.arrays) == expected[kind]
        assert (reply.metrics["work"] == 1.0) == (kind == "strong") and 0 < reply.metrics["work"] <= 1
    assert replies[(0, sim.device_names.index("weak"))].metrics["work"] < replies[
        (0, sim.device_names.index("moderate"))].metrics["work"]  # fmt: skip
    for r, row in enumerate(history.rounds):
        assert row["responded"] == 4 and row["rejected"] == 0
        up = sum(wire_nbytes(t) for (rr, _), reply in replies.items() if rr == r for t in reply.arrays.values())
        assert row["up_bytes"] == up
        full = sum(wire_nbytes(t) for t in communicated(alg.global_state).values())
        assert row["down_bytes"] == 4 * full + 2 * config_nbytes({"cut": 2}) + config_nbytes({"cut": 1})
    assert sim.ledger.tensor_uploads["6.weight"] == 8 and sim.ledger.tensor_uploads["0.weight"] == 2


def test_frozen_prefix_and_its_batchnorm_statistics_stay_unchanged_on_a_weak_client():
    sim = _sim(EmbracingFL(cuts={"weak": 1}), devices={"weak": 1.0}, momentum=0.9, weight_decay=1e-2)
    alg, model = sim.algorithm, sim.model
    instruction = alg.configure(0, [0])[0]
    assert instruction.config == {"cut": 1}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = ClientContext(0, 0, model, sim.client_data.batches(0, 8, 1), sim.client_data.num_samples(0), sim.local,
                        sim.loss_fn, sim.devices[0], {})  # fmt: skip
    reply = alg.client_update(ctx, instruction)
    after = model.state_dict()
    for k in alg.blocks[0].tensors:  # weights, BN affine, running statistics, num_batches_tracked
        assert torch.equal(after[k], before[k]), k
    for k in ("3.weight", "4.weight", "4.running_mean", "4.running_var", "6.weight"):  # the suffix did train
        assert not torch.equal(after[k], before[k]), k
    assert set(reply.arrays) == {k for b in alg.blocks[1:] for k in b.tensors if k != "4.num_batches_tracked"}
    assert all(p.requires_grad for p in model.parameters())  # the freeze is undone afterwards


def test_the_server_keeps_tensors_nobody_trained():
    sim = _sim(EmbracingFL(cuts={"weak": 1}), devices={"weak": 1.0})
    before = {k: v.clone() for k, v in sim.algorithm.global_state.items()}
    history = sim.run()
    assert all(row["responded"] == 4 for row in history.rounds)
    for k, v in sim.algorithm.global_state.items():
        assert torch.equal(v, before[k]) == (k.startswith(("0.", "1.")) or k.endswith("num_batches_tracked")), k


@pytest.mark.parametrize("name, shape", [("resnet20", (3, 32, 32)), ("cnn", (1, 8, 8))])
def test_memory_estimate_is_monotone_and_the_chosen_cut_fits(name, shape):
    alg = EmbracingFL()
    alg.setup(build_model(name, input_shape=shape), 3, [profile("strong"), profile("moderate"), profile("weak")])
    memory = [alg.memory_estimate(s) for s in range(len(alg.blocks))]
    assert all(a > b for a, b in zip(memory, memory[1:], strict=False))  # a longer suffix needs more memory
    work = [alg.work(s) for s in range(len(alg.blocks))]
    assert work[0] == 1.0 and all(a >= b > 1 / 3 for a, b in zip(work, work[1:], strict=False))
    assert alg.plan["strong"]["cut"] == 0 and alg.plan["strong"]["work"] == 1.0
    for kind, plan in alg.plan.items():
        budget = profile(kind).memory_fraction * memory[0]
        assert plan["memory_bytes"] == memory[plan["cut"]] and plan["budget_bytes"] == int(budget)
        if plan["fits"]:  # the longest suffix that fits
            assert memory[plan["cut"]] <= budget and (plan["cut"] == 0 or memory[plan["cut"] - 1] > budget)
        else:  # nothing fits: the last block alone
            assert plan["cut"] == len(alg.blocks) - 1 and min(memory) > budget
    if name == "resnet20":  # CIFAR-size ResNet-20: weak trains the last two residual blocks + FC, moderate 5..
        assert (alg.plan["weak"]["cut"], alg.plan["moderate"]["cut"]) == (8, 5)
        assert all(plan["fits"] for plan in alg.plan.values())


def test_a_plan_that_does_not_fit_warns_and_one_that_fits_does_not():
    import warnings

    devices = [profile("strong"), profile("moderate"), profile("weak")]
    with pytest.warns(UserWarning, match=r"no cut of this model fits 'weak' clients' memory budget"):
        EmbracingFL().setup(build_model("cnn", input_shape=(1, 8, 8)), 3, devices)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alg = EmbracingFL()
        alg.setup(build_model("resnet20", input_shape=(3, 32, 32)), 3, devices)
    assert all(plan["fits"] for plan in alg.plan.values())


def test_bad_options_raise_config_errors_naming_them():
    bad = [
        (dict(cuts={"wek": 1}), "cuts"),
        (dict(cuts={"weak": -1}), "cuts"),
        (dict(cuts={"weak": True}), "cuts"),
        (dict(cuts=[1, 2]), "cuts"),
        (dict(batch_size=0), "batch_size"),
        (dict(optimizer_slots=-1), "optimizer_slots"),
        (dict(input_shape=(0, 3)), "input_shape"),
        (dict(weighting="by-vibes"), "weighting"),
        (dict(cut=1), "cut"),
    ]
    for options, field in bad:
        with pytest.raises(ConfigError, match=field):
            make_algorithm("embracingfl", **options)
    with pytest.raises(ConfigError, match=r"cuts\['weak'\]=3 is out of range"):
        _sim(EmbracingFL(cuts={"weak": 3}), devices={"weak": 0.5})  # bn_model has blocks 0..2
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with pytest.raises(ConfigError, match="input_shape"):
        EmbracingFL().setup(conv, 1, [profile("strong")])
    alg = EmbracingFL(input_shape=(1, 8, 8))
    alg.setup(conv, 1, [profile("weak")])
    assert len(alg.blocks) == 2 and alg.plan["weak"]["cut"] in (0, 1)
