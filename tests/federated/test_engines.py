"""Client engines: the vectorised engine (and "auto") give the sequential engine's results to 1e-5 -- global model,
every round row (counts, losses, bytes, events), faults, fault hooks, non-finite clients -- and fall back to
sequential training, saying so in each round row, where vectorising would not be exact."""

import numpy as np
import pytest
import torch
from fl_fixtures import tiny_data, tiny_model
from torch import nn

from leantrain.federated import FedAvg, Reply, Simulator, make_algorithm, make_engine
from leantrain.federated.engines.vmap import AutoEngine, VmapEngine, cohort_batches, declares_full_model
from leantrain.federated.simulator import FederatedData, seed_for

SIZES = [3, 9, 20, 17, 31, 40]  # unequal; client 0 is smaller than the batch size


def uneven_data(sizes=SIZES, dim=6, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    bounds = np.cumsum([0, *sizes])
    parts = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    test = tiny_data(dim=dim, classes=classes).test
    return FederatedData({"x": x, "labels": y}, test, parts, classes, (dim,))


def run(engine, algorithm=None, model=tiny_model, data=None, **kw):
    args = dict(num_clients=6, clients_per_round=5, rounds=4, local_steps=5, batch_size=8, lr=0.1, seed=2)
    args.update(kw)
    sim = Simulator(algorithm or FedAvg(), model, data or uneven_data(), engine=engine, **args)
    history = sim.run()
    return sim, history


def assert_same(a, b, atol=1e-5):
    """Two (simulator, history) pairs give the same run (to 1e-5): global model, working model, rows."""
    (sa, ha), (sb, hb) = a, b
    for name, value in sa.algorithm.global_state.items():
        torch.testing.assert_close(sb.algorithm.global_state[name], value, rtol=0, atol=atol)
    for name, value in sa.model.state_dict().items():
        torch.testing.assert_close(sb.model.state_dict()[name], value, rtol=0, atol=atol)
    assert len(ha.rounds) == len(hb.rounds)
    for ra, rb in zip(ha.rounds, hb.rounds, strict=True):
        assert set(ra) == set(rb)
        for key, value in ra.items():
            if key in ("wall_s", "engine"):
                continue
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=atol, abs=atol), key
            else:
                assert rb[key] == value, key
    for key, value in ha.totals.items():
        assert hb.totals[key] == pytest.approx(value, rel=1e-5, abs=1e-5, nan_ok=True), key


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 1e-2)])
def test_vmap_equals_sequential_with_unequal_clients(momentum, weight_decay):
    seq = run("sequential", momentum=momentum, weight_decay=weight_decay)
    rng_after_seq = torch.initial_seed()
    vec = run("vmap", momentum=momentum, weight_decay=weight_decay)
    assert torch.initial_seed() == rng_after_seq  # the global RNG is left as train_one leaves it
    assert_same(seq, vec)
    assert all(row["engine"] == "vmap (5 clients together)" for row in vec[1].rounds)
    assert all(row["engine"] == "sequential" for row in seq[1].rounds)
    assert all(row["responded"] == 5 for row in vec[1].rounds)


def test_vectorised_groups_equal_sequential():
    seq = run("sequential", momentum=0.5, num_clients=6, clients_per_round=6)
    vec = run(VmapEngine(group=2), momentum=0.5, num_clients=6, clients_per_round=6)
    assert_same(seq, vec)
    assert vec[1].rounds[0]["engine"] == "vmap (6 clients in 3 groups of up to 2)"


@pytest.mark.parametrize("sizes, batch_size, steps", [(SIZES, 8, 5), ([1, 2, 7, 8, 16], 8, 7), ([5, 64], 32, 10)])
def test_cohort_batches_are_the_client_data_batches(sizes, batch_size, steps):
    sim = Simulator(FedAvg(), tiny_model, uneven_data(sizes), num_clients=len(sizes), clients_per_round=1,
                    local_steps=steps, batch_size=batch_size, seed=5)  # fmt: skip
    cids = list(range(len(sizes)))
    rows, counts = cohort_batches(sim, 3, cids)
    assert rows.shape == (len(cids), steps, min(batch_size, max(sizes)))
    for i, cid in enumerate(cids):
        stream = sim.client_batches(3, cid)
        for s in range(steps):
            batch = next(stream)
            n = int(counts[i, s])
            assert n == len(batch["labels"])
            torch.testing.assert_close(sim.client_data.arrays["x"][rows[i, s, :n]], batch["x"], rtol=0, atol=0)
            assert set(rows[i, s, n:].tolist()) <= {int(rows[i, s, 0])}  # padding repeats the batch's first row


def test_vmap_equals_sequential_with_dropout_and_failures():
    kw = dict(dropout=0.25, failure=0.35, rounds=8, momentum=0.9, weight_decay=1e-3)
    seq, vec = run("sequential", **kw), run("vmap", **kw)
    assert_same(seq, vec)
    rows = vec[1].rounds
    assert sum(r["dropped"] for r in rows) > 0 and sum(r["failed"] for r in rows) > 0
    events = [e for r in rows for e in r["events"]]
    assert any(e.endswith("failed: ClientFailure: injected client failure mid-round") for e in events)


def test_vmap_equals_sequential_with_a_fault_hook():
    def hook(r, cid, reply):
        if cid == 1:
            return Reply({k: v * float("nan") for k, v in reply.arrays.items()}, reply.metrics)
        if cid == 3 and r % 2:
            return Reply({k: v * 1e6 for k, v in reply.arrays.items()}, reply.metrics)
        if cid == 4:
            return Reply(reply.arrays, {**reply.metrics, "num_examples": 10**6})
        return reply

    kw = dict(fault_hook=hook, rounds=5, clients_per_round=6)
    seq, vec = run("sequential", **kw), run("vmap", **kw)
    assert_same(seq, vec)
    assert all(r["rejected"] >= 1 for r in vec[1].rounds)
    assert any("capped" in e for r in vec[1].rounds for e in r["events"])


def test_a_client_whose_loss_is_not_finite_fails_alone():
    data = uneven_data()
    data.train["x"][SIZES[0] + 4] = float("inf")  # a row of client 1
    kw = dict(data=data, clients_per_round=6, momentum=0.9)
    seq, vec = run("sequential", **kw), run("vmap", **kw)
    assert_same(seq, vec)
    for row in vec[1].rounds:
        assert row["failed"] == 1 and row["responded"] == 5
        (event,) = row["events"]
        assert event.startswith("client 1 failed: FloatingPointError: local loss is ")


FEDLAMA = "sequential (algorithm fedlama is not plain local SGD)"


def bn_model():
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def dropout_model():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))


@pytest.mark.parametrize(
    "algorithm, model, why",
    [
        (None, bn_model, "sequential (model has buffers)"),
        (None, dropout_model, "sequential (model has active dropout)"),
        (lambda: make_algorithm("fedlama", phi=2), tiny_model, FEDLAMA),
    ],
)
@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_unsupported_cohorts_are_trained_sequentially(engine, algorithm, model, why):
    kw = dict(model=model, rounds=2)
    seq = run("sequential", algorithm and algorithm(), **kw)
    other = run(engine, algorithm and algorithm(), **kw)
    assert_same(seq, other)
    assert [row["engine"] for row in other[1].rounds] == [why, why]


@pytest.mark.parametrize(
    "timings, first, later",
    [
        ((1.0, 2.0), None, "vmap (5 clients together; measured 2.0x faster)"),
        ((4.0, 1.0), None, "sequential (vmap measured 0.25x as fast for 5 clients)"),
        (None, "1 sequential, then vmap (4 clients together; measuring: vmap ", None),
    ],
)
def test_auto_follows_its_measurement(timings, first, later):
    engine = AutoEngine()
    sim = Simulator(FedAvg(), tiny_model, uneven_data(), num_clients=6, clients_per_round=5, rounds=3,
                    local_steps=5, batch_size=8, lr=0.1, seed=2, engine=engine)  # fmt: skip
    if timings is not None:
        engine.measured[AutoEngine.key(sim, 5)] = timings
    history = sim.run()
    assert_same(run("sequential", rounds=3), (sim, history))
    rows = [row["engine"] for row in history.rounds]
    if first is None:
        assert rows == [later] * 3
    else:
        assert rows[0].startswith(first) and rows[0].endswith("x as fast)")
        vec, seq = engine.measured[AutoEngine.key(sim, 5)]
        assert rows[1] == rows[2] and rows[1].startswith("vmap (5 clients" if vec < seq else "sequential (vmap")


def test_auto_is_the_default_engine_and_measures_once():
    engine = make_engine("auto")
    assert isinstance(engine, AutoEngine) and isinstance(make_engine("vmap"), VmapEngine)
    assert_same(run("sequential", rounds=4), run(engine, rounds=4))
    assert len(engine.measured) == 1
    default = Simulator(FedAvg(), tiny_model, uneven_data(), num_clients=6, clients_per_round=2)
    assert isinstance(default.engine, AutoEngine)


def test_a_model_torch_func_cannot_vectorise_is_trained_sequentially():
    class ItemModel(nn.Module):  # .item() in forward: vmap cannot batch it
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            return self.lin(x) * (1.0 + 0.0 * x.abs().max().item())

    seq, vec = run("sequential", model=ItemModel, rounds=2), run("vmap", model=ItemModel, rounds=2)
    assert_same(seq, vec)
    assert all(row["engine"].startswith("sequential (vmap failed: ") for row in vec[1].rounds)


def cnn_model():
    return nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
                         nn.Flatten(), nn.Linear(12, 3))  # fmt: skip


def test_convolutions_are_vectorised_by_vmap_but_not_by_auto():
    seq = run("sequential", model=cnn_model, rounds=3, momentum=0.9)
    vec, auto = run("vmap", model=cnn_model, rounds=3, momentum=0.9), run("auto", model=cnn_model, rounds=3)
    assert_same(seq, vec, atol=1e-4)  # grouped convolutions: float rounding, or a max-pool near-tie flipping
    assert vec[1].rounds[0]["engine"] == "vmap (5 clients together)"
    why = "sequential (vmap reproduces linear layers and activations exactly, not Conv1d, MaxPool1d)"
    assert [row["engine"] for row in auto[1].rounds] == [why] * 3


def test_only_the_class_defining_client_update_declares_full_model():
    class OwnSampling(FedAvg):
        def sample(self, round_idx, k, rng, available):
            return super().sample(round_idx, k, rng, available)

    class OwnUpdate(FedAvg):
        def client_update(self, ctx, instruction):
            return super().client_update(ctx, instruction)

    assert declares_full_model(FedAvg()) and declares_full_model(OwnSampling())
    assert not declares_full_model(OwnUpdate()) and not declares_full_model(make_algorithm("fedlama"))
    assert run("vmap", OwnUpdate(), rounds=1)[1].rounds[0]["engine"].startswith("sequential (algorithm")


def test_seed_for_is_what_the_engine_reseeds_with():
    sim, _ = run("vmap", rounds=1, dropout=0.0)
    cohort = sorted(int(c) for c in np.random.default_rng(seed_for(2, 0)).choice(6, size=5, replace=False))
    assert torch.initial_seed() == seed_for(2, 0, cohort[-1], 1)
