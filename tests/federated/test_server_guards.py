"""The server no client can break, and the weighting by dataset size: n_i weights (not samples processed), any
client exception is a failed client, absurd replies (1e30x updates, 1e9-sample claims) leave the global model
intact, and the last-10-rounds accuracy."""

import numpy as np
import pytest
import torch
from fl_fixtures import tiny_data, tiny_model

from leantrain.errors import ConfigError
from leantrain.federated import FedAvg, Reply, ReplyGuard, Simulator
from leantrain.federated.simulator import FederatedData, History


def _unequal_data(sizes=(6, 30, 12)):
    data = tiny_data(num_clients=1, per_client=sum(sizes))
    edges = np.cumsum((0, *sizes))
    parts = [np.arange(edges[i], edges[i + 1]) for i in range(len(sizes))]
    return FederatedData(data.train, data.test, parts, data.num_classes, data.input_shape)


def _spy_sim(hook=None, guard=None, sizes=(6, 30, 12), algorithm=None, **kw):
    """Every client each round (tau=2, batch 4: everyone processes 8 samples); replies as the server saw them."""
    seen = {}

    def spy(r, cid, reply):
        reply = hook(r, cid, reply) if hook else reply
        seen[(r, cid)] = Reply({k: v.clone() for k, v in reply.arrays.items()}, dict(reply.metrics))
        return reply

    args = dict(num_clients=len(sizes), clients_per_round=len(sizes), rounds=1, local_steps=2, batch_size=4, lr=0.1)
    args.update(kw)
    sim = Simulator(algorithm or FedAvg(), tiny_model, _unequal_data(sizes), fault_hook=spy, guard=guard, **args)
    return sim, seen


def _weighted_mean(replies, weights, name):
    total = sum(w * replies[c].arrays[name].double() for c, w in weights.items())
    return (total / sum(weights.values())).float()


def test_samples_weighting_uses_each_clients_dataset_size():
    sizes = (8, 40, 12)
    sim, seen = _spy_sim(sizes=sizes)
    sim.run()
    replies = {cid: seen[(0, cid)] for cid in range(3)}
    assert all(r.metrics["samples"] == 8 for r in replies.values())  # the same work for everyone...
    assert [replies[c].metrics["num_examples"] for c in range(3)] == list(sizes)  # ...but different n_i
    for name, value in sim.algorithm.global_state.items():
        expected = _weighted_mean(replies, dict(enumerate(sizes)), name)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        equal = _weighted_mean(replies, dict.fromkeys(range(3), 1.0), name)
        assert not torch.allclose(value, equal, atol=1e-6), name  # the old rule (samples processed) differs


def test_uniform_weighting_ignores_sizes():
    sim, seen = _spy_sim(algorithm=FedAvg(weighting="uniform"))
    sim.run()
    replies = {cid: seen[(0, cid)] for cid in range(3)}
    for name, value in sim.algorithm.global_state.items():
        torch.testing.assert_close(value, _weighted_mean(replies, dict.fromkeys(range(3), 1.0), name))


class Fragile(FedAvg):
    """FedAvg whose client 1 hits a bug (any exception type) in its update."""

    def __init__(self, error):
        super().__init__()
        self.error = error

    def client_update(self, ctx, instruction):
        if ctx.cid == 1:
            raise self.error
        return super().client_update(ctx, instruction)


@pytest.mark.parametrize(
    "error", [ValueError("bad shapes"), KeyError("w"), RuntimeError("CUDA-like"), ZeroDivisionError()]
)
def test_any_client_exception_marks_that_client_failed_and_the_run_goes_on(error):
    sim, seen = _spy_sim(algorithm=Fragile(error), rounds=2)
    history = sim.run()
    for row in history.rounds:
        assert row["failed"] == 1 and row["responded"] == 2
        assert any(e.startswith(f"client 1 failed: {type(error).__name__}") for e in row["events"]), row["events"]
    replies = {cid: seen[(1, cid)] for cid in (0, 2)}
    for name, value in sim.algorithm.global_state.items():  # round 1's mean of the two survivors, weights n_i
        torch.testing.assert_close(value, _weighted_mean(replies, {0: 6, 2: 12}, name), rtol=1e-6, atol=1e-7)


def test_a_config_error_in_a_client_update_stops_the_run():
    with pytest.raises(ConfigError, match="misconfigured"):
        _spy_sim(algorithm=Fragile(ConfigError("misconfigured")))[0].run()


def _scaled(cid_bad, factor):
    def hook(r, cid, reply):
        if cid != cid_bad:
            return reply
        return Reply({k: v * factor for k, v in reply.arrays.items()}, reply.metrics)

    return hook


def test_a_huge_update_is_rejected_and_the_global_model_survives():
    sim, seen = _spy_sim(_scaled(1, 1e30), sizes=(6, 30, 12, 9))
    history = sim.run()
    row = history.rounds[0]
    assert row["rejected"] == 1 and row["responded"] == 3
    assert any("client 1 rejected: update of" in e and "median" in e for e in row["events"])
    replies = {cid: seen[(0, cid)] for cid in (0, 2, 3)}
    for name, value in sim.algorithm.global_state.items():
        torch.testing.assert_close(value, _weighted_mean(replies, {0: 6, 2: 12, 3: 9}, name), rtol=1e-6, atol=1e-7)
    # without the guard the same reply destroys the model (so the test above can fail)
    sim, _ = _spy_sim(_scaled(1, 1e30), sizes=(6, 30, 12, 9), guard=ReplyGuard.off())
    sim.run()
    assert max(float(v.abs().max()) for v in sim.algorithm.global_state.values()) > 1e20


def test_the_huge_update_is_caught_with_only_two_replies():
    sim, _ = _spy_sim(_scaled(0, 1e30), sizes=(6, 30))
    row = sim.run().rounds[0]
    assert row["rejected"] == 1 and row["responded"] == 1
    assert max(float(v.abs().max()) for v in sim.algorithm.global_state.values()) < 1e3


def test_an_absurd_sample_claim_is_capped_at_the_known_dataset_size():
    def liar(r, cid, reply):
        return Reply(reply.arrays, {**reply.metrics, "num_examples": 1e9}) if cid == 1 else reply

    sim, seen = _spy_sim(liar)
    row = sim.run().rounds[0]
    assert row["responded"] == 3
    assert any("client 1 claimed 1e+09 samples; capped to 30" in e for e in row["events"])
    replies = {cid: seen[(0, cid)] for cid in range(3)}
    for name, value in sim.algorithm.global_state.items():
        torch.testing.assert_close(value, _weighted_mean(replies, {0: 6, 1: 30, 2: 12}, name), rtol=1e-6, atol=1e-7)


def test_a_configured_maximum_caps_sample_claims_too():
    sim, seen = _spy_sim(guard=ReplyGuard(max_examples=10))
    sim.run()
    replies = {cid: seen[(0, cid)] for cid in range(3)}
    for name, value in sim.algorithm.global_state.items():
        torch.testing.assert_close(value, _weighted_mean(replies, {0: 6, 1: 10, 2: 10}, name), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "bad", [{"norm_ratio": 1.0}, {"norm_ratio": True}, {"max_examples": 0}, {"max_examples": 2.5}]
)
def test_guard_settings_are_validated(bad):
    with pytest.raises(ConfigError, match="ReplyGuard"):
        ReplyGuard(**bad)


def test_last_window_accuracy_is_the_mean_of_the_last_ten_evaluations():
    history = History(rounds=[{"round": r, "test_accuracy": r / 100 if r % 2 else None} for r in range(30)])
    assert history.window_mean("test_accuracy") == pytest.approx(np.mean([r / 100 for r in range(11, 30, 2)]))
    assert History().window_mean("test_accuracy") is None
    sim = Simulator(FedAvg(), tiny_model, tiny_data(4), num_clients=4, clients_per_round=2, rounds=12,
                    local_steps=1, batch_size=8, lr=0.1)  # fmt: skip
    h = sim.run()
    accs = [row["test_accuracy"] for row in h.rounds]
    assert h.totals["last10_test_accuracy"] == pytest.approx(np.mean(accs[-10:]))
    assert h.totals["final_test_accuracy"] == accs[-1]
