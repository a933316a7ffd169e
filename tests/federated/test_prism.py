"""PriSM: the decomposition is exact, sampling follows s^gamma, one factorized SGD step is the exact two-factor update
(the other tensors match FedAvg), kernels are averaged over the clients that trained them, re-orthogonalized
factors stay orthogonal and reproduce W, only the kept slices travel, the channel baseline, heterogeneous keep and
work, a fresh (Flower client-side) object trains from another object's instruction, and a short run learns."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.federated import ClientContext, Simulator, make_algorithm, wire_nbytes
from leantrain.federated.algorithms.base import Reply
from leantrain.federated.algorithms.prism import (
    PriSM,
    principal_factors,
    sample_kernels,
    sampling_probabilities,
)
from leantrain.federated.client import LocalTraining
from leantrain.federated.clock import profile
from leantrain.federated.comm import config_nbytes
from leantrain.models import build_model
from leantrain.train.tasks import ClassificationTask


def cnn():
    """conv1 1->4 (the input conv: kept dense), conv2 4->6 3x3 (decomposed, r = min(6, 36) = 6), two FCs."""
    return build_model("cnn", input_shape=(1, 8, 8), num_classes=3, channels=(4, 6), hidden=8)


def _setup(alg, model=None, devices=("strong", "strong")):
    torch.manual_seed(0)
    model = model or cnn()
    alg.setup(model, len(devices), [profile(d) for d in devices])
    alg.seed = 0
    return model


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 1, 8, 8, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def _ctx(model, cid=0, steps=1, lr=0.1, batch=None, **local):
    batches = itertools.repeat(batch or _batch())
    return ClientContext(cid, 0, model, batches, 16, LocalTraining(steps, 16, lr, **local),
                         ClassificationTask().loss, profile("strong"), {})  # fmt: skip


def test_decomposition_reproduces_the_weight_with_orthogonal_factors():
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    u, v, s = principal_factors(w)
    assert u.shape == (16, 16) and v.shape == (16, 72) and torch.all(s[:-1] >= s[1:])
    torch.testing.assert_close(u @ v, w.reshape(16, -1), rtol=0, atol=1e-12)
    torch.testing.assert_close(u.T @ u, torch.diag(s), rtol=0, atol=1e-12)  # √S absorbed in both factors
    torch.testing.assert_close(v @ v.T, torch.diag(s), rtol=0, atol=1e-12)


def test_sampling_follows_s_to_the_gamma_and_gamma_zero_is_uniform():
    s = np.array([4.0, 2.0, 1.0, 1.0, 0.0])
    rng = np.random.default_rng(0)
    draws = 3000
    for gamma, rule in ((1.0, "power"), (2.0, "power"), (0.0, "power"), (1.0, "softmax")):
        p = sampling_probabilities(s, gamma, rule)
        expect = {1.0: s / s.sum(), 2.0: s**2 / (s**2).sum(), 0.0: np.full(5, 0.2)}[gamma]
        if rule == "softmax":
            expect = np.exp(s) / np.exp(s).sum()
        np.testing.assert_allclose(p, expect)
        counts = np.bincount([sample_kernels(s, 1, rng, gamma, rule)[0] for _ in range(draws)], minlength=5)
        sd = np.sqrt(draws * expect * (1 - expect)) + 1e-9
        assert np.all(np.abs(counts - draws * expect) < 5 * sd), (gamma, rule, counts)  # 5 sigma
    both = sample_kernels(s, 5, rng)  # the zero singular value is drawn only when nothing else is left
    assert both == [0, 1, 2, 3, 4] and 4 not in sample_kernels(s, 4, rng)


def test_one_factorized_step_is_the_exact_two_factor_update_and_the_rest_matches_fedavg():
    alg = PriSM(keep=1.0)
    model = _setup(alg)
    ins = alg.configure(0, [0])[0]
    assert ins.config == {"prism": {"features.3.weight": list(range(6))}}
    u, v = ins.arrays["features.3.weight.prism_u"].double(), ins.arrays["features.3.weight.prism_v"].double()
    # FedAvg's step on the dense model: the dense gradient G of conv2 and every other tensor's new value
    dense = cnn()
    dense.load_state_dict(alg.global_state)
    loss = ClassificationTask().loss(dense, _batch())[0]
    loss.backward()
    g = dense.features[3].weight.grad.reshape(6, -1).double()
    with torch.no_grad():
        for p in dense.parameters():
            p -= 0.1 * p.grad
    reply = alg.client_update(_ctx(model), ins)
    for k, t in dense.state_dict().items():
        if k in reply.arrays:
            torch.testing.assert_close(reply.arrays[k], t, rtol=0, atol=1e-6)
    u1, v1 = reply.arrays["features.3.weight.prism_u"].double(), reply.arrays["features.3.weight.prism_v"].double()
    torch.testing.assert_close(u1, u - 0.1 * g @ v.T, rtol=0, atol=1e-6)  # dL/dU = G Vᵀ
    torch.testing.assert_close(v1, v - 0.1 * u.T @ g, rtol=0, atol=1e-6)  # dL/dV = Uᵀ G
    exact = u @ v - 0.1 * (u @ u.T @ g + g @ v.T @ v) + 0.01 * g @ v.T @ u.T @ g  # not FedAvg's W - 0.1 G
    torch.testing.assert_close(u1 @ v1, exact, rtol=0, atol=1e-6)
    assert reply.metrics["work"] > 1  # at keep 1 the two-conv form costs more than the dense conv (r(D+out) > out D)


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_kernels_are_averaged_over_the_clients_that_trained_them_then_reorthogonalized(weighting):
    alg = PriSM(keep=0.5, weighting=weighting)
    _setup(alg)
    old_w = alg.global_state["features.3.weight"].clone()
    u0, v0, _ = (t.double() for t in principal_factors(old_w))
    ins = alg.configure(0, [0, 1])
    name = "features.3.weight"
    idx = {c: ins[c].config["prism"][name] for c in (0, 1)}
    assert all(len(i) == 3 for i in idx.values()) and idx[0] != idx[1]
    fill, examples = {0: 1.0, 1: 3.0}, {0: 1, 1: 3}
    for c in (0, 1):
        arrays = {k: torch.full_like(t, fill[c]) for k, t in ins[c].arrays.items()}
        alg.accumulate(0, c, Reply(arrays, {"num_examples": examples[c], "samples": 16}))
    alg.aggregate(0)
    w = {0: 1.0, 1: 1.0} if weighting == "uniform" else {0: 1.0, 1: 3.0}
    u, v = u0.clone(), v0.clone()
    for j in range(6):
        who = [c for c in (0, 1) if j in idx[c]]
        if who:  # sum_i w_i x_i / sum_i w_i over the clients that trained kernel j; the others keep their values
            value = sum(w[c] * fill[c] for c in who) / sum(w[c] for c in who)
            u[:, j], v[j, :] = value, value
    torch.testing.assert_close(alg.global_state[name].double(), (u @ v).reshape(6, 4, 3, 3), rtol=0, atol=1e-5)
    other = sum(w[c] * fill[c] for c in (0, 1)) / sum(w.values())  # FedAvg for everything else
    assert torch.allclose(alg.global_state["classifier.1.weight"], torch.tensor(other))
    # re-orthogonalization: the next round's factors are orthogonal and reproduce the aggregated weight
    nu, nv = alg.parts()[name]["u"].double(), alg.parts()[name]["v"].double()
    torch.testing.assert_close(nu @ nv, alg.global_state[name].double().reshape(6, -1), rtol=0, atol=1e-4)
    gram_u, gram_v = nu.T @ nu, nv @ nv.T
    torch.testing.assert_close(gram_u, torch.diag(torch.diagonal(gram_u)), rtol=0, atol=1e-4)
    torch.testing.assert_close(gram_v, torch.diag(torch.diagonal(gram_v)), rtol=0, atol=1e-4)


def _digits_sim(algorithm, rounds=2, **kw):
    args = dict(num_clients=8, clients_per_round=4, rounds=rounds, local_steps=5, batch_size=16, lr=0.1,
                momentum=0.9, engine="sequential", partition="iid", eval_every=1, seed=1)  # fmt: skip
    args.update(kw)
    model_fn = lambda: build_model("cnn", input_shape=(1, 8, 8), num_classes=10, channels=(8, 16), hidden=32)  # noqa: E731
    return Simulator(algorithm, model_fn, "digits", **args)


def test_only_the_kept_slices_travel_and_the_ledger_counts_them():
    replies, sent = {}, {}

    def spy(r, cid, reply):
        replies[cid] = reply
        return reply

    sim = _digits_sim(PriSM(keep=0.25, out_keep=0.5), rounds=1, fault_hook=spy)
    alg = sim.algorithm
    configure = alg.configure
    alg.configure = lambda r, cohort: sent.update(configure(r, cohort)) or sent
    row = sim.run().rounds[0]
    dense = {k: v for k, v in alg.global_state.items() if v.is_floating_point() and k != "features.3.weight"}
    n, out_rows, fan_in = math.ceil(0.25 * 16), 8, 8 * 9  # conv2: 8 -> 16, r = 16; the first half of U's rows
    slices = {"features.3.weight.prism_u": (out_rows, n), "features.3.weight.prism_v": (n, fan_in)}
    slice_bytes = sum(wire_nbytes(torch.zeros(shape)) for shape in slices.values())
    dense_bytes = sum(wire_nbytes(t) for t in dense.values())
    assert len(replies) == 4
    for cid, reply in replies.items():
        assert {k: tuple(t.shape) for k, t in reply.arrays.items()} == {
            **{k: tuple(t.shape) for k, t in dense.items()}, **slices}  # fmt: skip
        assert sent[cid].config == {"prism": {"features.3.weight": sent[cid].config["prism"]["features.3.weight"]}}
        assert len(sent[cid].config["prism"]["features.3.weight"]) == n
    assert row["up_params"] == 4 * (sum(t.numel() for t in dense.values()) + n * (out_rows + fan_in))
    assert row["up_bytes"] == 4 * (dense_bytes + slice_bytes)
    configs = sum(config_nbytes(ins.config) for ins in sent.values())  # the index lists travel down
    assert row["down_bytes"] == 4 * (dense_bytes + slice_bytes) + configs
    full = sum(wire_nbytes(t) for t in alg.global_state.values() if t.is_floating_point())
    assert row["up_bytes"] < 4 * full


def test_a_short_run_learns_and_the_channel_baseline_keeps_untrained_channels():
    sim = _digits_sim(PriSM(keep=0.25), rounds=8, local_steps=20, batch_size=32)
    init = sim.evaluate()["accuracy"]
    history = sim.run()
    assert history.last("test_accuracy") > init + 0.4  # 0.07 -> 0.81 with seed 1
    channels = _digits_sim(PriSM(keep=0.25, basis="channels"), rounds=1, clients_per_round=1)
    before = channels.algorithm.global_state["features.3.weight"].clone()
    ins = channels.algorithm.configure(0, [0])[0]
    kept = ins.config["prism"]["features.3.weight"]
    assert ins.arrays["features.3.weight.prism_rows"].shape == (4, 72) and len(kept) == 4
    channels.run()
    after = channels.algorithm.global_state["features.3.weight"]
    moved = [c for c in range(16) if not torch.equal(after[c], before[c])]
    assert moved and set(moved) <= set(kept)  # only the sampled output channels were trained


def test_heterogeneous_keep_and_work():
    alg = PriSM(keep={"weak": 0.25, "moderate": 0.5})
    _setup(alg, devices=("weak", "moderate", "strong"))
    ins = alg.configure(3, [0, 1, 2])
    sizes = [len(ins[c].config["prism"]["features.3.weight"]) for c in (0, 1, 2)]
    assert sizes == [2, 3, 6]  # ceil(0.25 * 6), ceil(0.5 * 6), all
    work = [alg.work({"features.3.weight": s}) for s in sizes]
    macs = 64 * 40 + 16 * 222 + 200 + 27  # params x output positions: conv1 at 8x8, conv2 at 4x4, the two FCs
    assert alg._macs == macs
    for size, w in zip(sizes, work, strict=True):  # conv2 as V-conv (n x 36) + 1x1 U-conv (6 x n) instead of 6 x 36
        assert w == pytest.approx((macs - 16 * (6 * 36 - size * 36 - 6 * size)) / macs)
    assert 0 < work[0] < work[1] < 1 < work[2]


def test_a_fresh_object_trains_from_another_objects_instruction():
    """The Flower ClientApp builds a new algorithm and calls only setup() before client_update."""
    server = make_algorithm("prism", keep=0.5, gamma=0.0)
    model = _setup(server)
    ins = server.configure(2, [1])[1]
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    reference = server.client_update(_ctx(model, cid=1, steps=3, momentum=0.9, weight_decay=1e-3), ins)
    client = make_algorithm("prism", keep=0.5, gamma=0.0)
    fresh = cnn()
    fresh.load_state_dict(pristine)
    client.setup(fresh, 2, [profile("strong")] * 2)
    reply = client.client_update(_ctx(fresh, cid=1, steps=3, momentum=0.9, weight_decay=1e-3), ins)
    assert set(reply.arrays) == set(reference.arrays)
    for k in reply.arrays:
        assert torch.equal(reply.arrays[k], reference.arrays[k]), k
    assert all(p.requires_grad for p in fresh.parameters())  # the freeze of the decomposed weight is undone


def test_bad_options_and_models_raise_config_errors():
    bad = ({"keep": 0}, {"keep": 1.5}, {"keep": {"tiny": 0.2}}, {"gamma": -1}, {"sampling": "top"},
           {"basis": "rows"}, {"out_keep": 0}, {"basis": "channels", "out_keep": 0.4}, {"layers": "conv"})  # fmt: skip
    for kw in bad:
        with pytest.raises(ConfigError):
            PriSM(**kw)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(ConfigError, match="decompose_linear"):
        _setup(PriSM(), mlp)
    with pytest.raises(ConfigError, match="not modules"):
        _setup(PriSM(layers=["conv9"]))
    alg = PriSM(decompose_linear=True)
    _setup(alg, mlp)
    assert [x.weight for x in alg.layers] == ["0.weight", "2.weight"]


def test_flower_round_loop_reproduces_the_simulator():
    """Through the Flower strategy and ClientApp (in process): the same global model, ledger and metrics."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity
    from test_flower import _config, _flower_run

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    try:
        config = _config(algorithm="prism", algorithm_options={"keep": 0.5, "decompose_linear": True}, rounds=2)
        strategy, _, _ = _flower_run(config)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    sim = config.simulator()
    history = sim.run()
    assert len(sim.algorithm.layers) == 3  # the MLP's three linear layers
    for k, v in sim.algorithm.global_state.items():
        assert torch.equal(strategy.algorithm.global_state[k], v), k
    assert strategy.ledger.state_dict() == sim.ledger.state_dict()
    for ours, theirs in zip(strategy.rounds, history.rounds, strict=True):
        assert ours["responded"] == theirs["responded"] == config.clients_per_round
        assert ours["flower"]["up_bytes"] == ours["up_bytes"] == theirs["up_bytes"]
        assert ours["flower"]["down_bytes"] == ours["down_bytes"] == theirs["down_bytes"]
