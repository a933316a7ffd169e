"""The simulator core with FedAvg: ledger == serialized bytes, FedAvg(1 client) == centralized SGD, faults,
malformed replies rejected, exact resume."""

import copy
import json

import pytest
import torch
from fl_fixtures import tiny_data, tiny_model

from leantrain.errors import ConfigError
from leantrain.federated import ByteLedger, FedAvg, Reply, Simulator, encode_arrays
from leantrain.federated.intake import check_reply


def _sim(algorithm=None, **kw):
    args = dict(num_clients=4, clients_per_round=2, rounds=3, local_steps=3, batch_size=8, lr=0.1)
    args.update(kw)
    data = args.pop("data", None) or tiny_data(args["num_clients"])
    return Simulator(algorithm or FedAvg(), tiny_model, data, **args)


def test_ledger_counts_the_serialized_bytes():
    arrays = {"w": torch.randn(5, 3), "b": torch.zeros(3), "i": torch.arange(4), "h": torch.ones(2, 2).bfloat16()}
    config = {"recycled": [1, 4], "cut": 3}
    ledger = ByteLedger()
    n = ledger.record(0, 7, "up", arrays, config)
    serialized = sum(len(b) for b in encode_arrays(arrays).values()) + len(json.dumps(config, separators=(",", ":")))
    assert n == serialized
    assert ledger.totals()["up_bytes"] == serialized and ledger.totals()["up_messages"] == 1
    assert ledger.tensor_uploads == {"w": 1, "b": 1, "i": 1, "h": 1}
    with pytest.raises(ConfigError, match="direction"):
        ledger.record(0, 1, "sideways", arrays)


def test_round_bytes_match_the_model_size():
    sim = _sim(rounds=1)
    history = sim.run()
    per_model = sum(len(b) for b in encode_arrays({k: v for k, v in sim.model.state_dict().items()}).values())
    assert history.rounds[0]["down_bytes"] == 2 * per_model == history.rounds[0]["up_bytes"]


def test_fedavg_with_one_client_equals_centralized_sgd():
    data = tiny_data(num_clients=1, per_client=40)
    sim = Simulator(FedAvg(), tiny_model, data, num_clients=1, clients_per_round=1, rounds=3, local_steps=4,
                    batch_size=8, lr=0.1, momentum=0.9, seed=3)  # fmt: skip
    reference = copy.deepcopy(sim.model)
    sim.run()
    from leantrain.federated.simulator import seed_for

    for r in range(3):  # the same batches, a fresh SGD-with-momentum optimizer each round
        opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
        batches = sim.client_data.batches(0, 8, seed_for(3, r, 0))
        for _ in range(4):
            batch = next(batches)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(reference(batch["x"]), batch["labels"]).backward()
            opt.step()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(sim.algorithm.global_state[name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (lambda a: {**a, "0.weight": a["0.weight"][:, :-1]}, "shape"),
        (lambda a: {**a, "0.weight": a["0.weight"] * float("nan")}, "NaN"),
        (lambda a: {**a, "2.bias": a["2.bias"].double()}, "dtype"),
        (lambda a: {k: v for k, v in a.items() if k != "2.bias"}, "missing"),
        (lambda a: {**a, "extra": torch.zeros(1)}, "unexpected"),
    ],
)
def test_malformed_replies_are_rejected_without_touching_the_global_model(tamper, reason):
    def hook(r, cid, reply):
        return Reply(tamper(dict(reply.arrays)), reply.metrics)

    sim = _sim(fault_hook=hook, rounds=2)
    before = {k: v.clone() for k, v in sim.algorithm.global_state.items()}
    history = sim.run()
    assert all(row["rejected"] == 2 and row["responded"] == 0 for row in history.rounds)
    assert any(reason in e for e in history.rounds[0]["events"])
    assert all(torch.equal(before[k], v) for k, v in sim.algorithm.global_state.items())
    assert history.rounds[0]["up_bytes"] > 0  # the malformed bytes did travel


def test_check_reply_rejects_bad_sample_counts():
    reply = Reply({"w": torch.zeros(2)}, {"samples": -3, "num_examples": 5})
    assert "samples" in check_reply(reply, {"w": ((2,), torch.float32)})


def test_dropout_and_mid_round_failures_are_counted_and_harmless():
    sim = _sim(num_clients=8, clients_per_round=8, rounds=4, dropout=0.3, failure=0.3, seed=1)
    history = sim.run()
    dropped = sum(r["dropped"] for r in history.rounds)
    failed = sum(r["failed"] for r in history.rounds)
    responded = sum(r["responded"] for r in history.rounds)
    assert dropped > 0 and failed > 0 and responded > 0 and dropped + failed + responded == 32
    assert all(r["up_messages"] == r["responded"] for r in history.rounds)  # no uplink from the lost clients
    assert all(torch.isfinite(v).all() for v in sim.algorithm.global_state.values() if v.is_floating_point())
    # same seed, same faults
    again = _sim(num_clients=8, clients_per_round=8, rounds=4, dropout=0.3, failure=0.3, seed=1).run()
    assert [r["events"] for r in again.rounds] == [r["events"] for r in history.rounds]


def test_resume_continues_to_the_same_result(tmp_path):
    straight = _sim(rounds=5, dropout=0.2, seed=2)
    full = straight.run()
    first = _sim(rounds=2, dropout=0.2, seed=2, checkpoint_dir=tmp_path)
    first.run()
    resumed = _sim(rounds=5, dropout=0.2, seed=2, checkpoint_dir=tmp_path)
    history = resumed.run(resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_s", "engine")} for r in rows]  # noqa: E731
    assert strip(history.rounds) == strip(full.rounds)
    for k, v in straight.algorithm.global_state.items():
        assert torch.equal(v, resumed.algorithm.global_state[k])
    assert history.totals == full.totals


def test_bad_configuration_errors():
    with pytest.raises(ConfigError, match="clients_per_round"):
        _sim(clients_per_round=5)
    with pytest.raises(ConfigError, match="dropout"):
        _sim(dropout=1.0)
    with pytest.raises(ConfigError, match="weighting"):
        FedAvg(weighting="by-vibes")
    with pytest.raises(ConfigError, match="Algorithm"):
        Simulator("fedavg", tiny_model, tiny_data(), num_clients=4)
