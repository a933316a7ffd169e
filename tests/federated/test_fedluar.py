"""FedLUAR: δ=0 is FedAvg, recycled layers never travel up (bytes drop by exactly their size), the server recycles
last_update and averages the rest, layers are drawn with p ∝ 1/score, exact resume, option validation."""

import json

import numpy as np
import pytest
import torch
from fl_fixtures import tiny_data, tiny_model

from leantrain.errors import ConfigError
from leantrain.federated import FedAvg, Reply, Simulator, encode_arrays, make_algorithm
from leantrain.federated.algorithms.fedluar import FedLUAR, luar_score, recycled_count, sample_recycled


def _sim(algorithm, **kw):
    args = dict(
        num_clients=6, clients_per_round=3, rounds=4, local_steps=3, batch_size=8, lr=0.1, seed=1, engine="sequential"
    )  # bitwise comparisons
    args.update(kw)
    return Simulator(algorithm, tiny_model, tiny_data(args["num_clients"]), **args)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "engine")} for r in rows]  # timing, not results


def test_no_recycling_equals_fedavg_exactly():
    luar, avg = _sim(FedLUAR(recycled_layers=0)), _sim(FedAvg())
    h_luar, h_avg = luar.run(), avg.run()
    for k, v in avg.algorithm.global_state.items():
        assert torch.equal(luar.algorithm.global_state[k], v), k
    assert _strip(h_luar.rounds) == _strip(h_avg.rounds)  # same cohorts, losses, bytes, accuracy


def test_recycled_layers_are_not_uploaded_and_uplink_drops_by_their_size():
    seen = []

    def spy(r, cid, reply):
        seen.append((r, cid, set(reply.arrays), list(luar.algorithm.recycled)))
        return reply

    luar = _sim(FedLUAR(recycled_layers=1), fault_hook=spy)
    avg = _sim(FedAvg())
    h_luar, h_avg = luar.run(), avg.run()
    sizes = {k: len(b) for k, b in encode_arrays(luar.algorithm.global_state).items()}
    kernels = luar.algorithm.kernels
    for r, row in enumerate(h_luar.rounds):
        recycled = {tuple(s[3]) for s in seen if s[0] == r}
        assert len(recycled) == 1  # one R_t for the whole cohort
        recycled = list(recycled.pop())
        assert len(recycled) == (0 if r == 0 else 1)  # round 0 recycles nothing
        for _, _, names, _ in (s for s in seen if s[0] == r):
            assert names == set(sizes) - set(recycled)
        m = row["responded"]
        assert row["up_bytes"] == h_avg.rounds[r]["up_bytes"] - m * sum(sizes[k] for k in recycled)
        config = {"recycled": [kernels.index(k) for k in recycled]} if recycled else {}
        extra = len(json.dumps(config, separators=(",", ":"))) if config else 0
        assert row["down_bytes"] == h_avg.rounds[r]["down_bytes"] + m * extra  # the full model still goes down
    uploads = luar.ledger.tensor_uploads
    assert sum(uploads[k] for k in kernels) == 3 * 4 * len(kernels) - 3 * 3  # 3 clients x 3 recycled rounds
    assert all(uploads[k] == 12 for k in sizes if k not in kernels)  # biases travel every round


def test_hand_checked_round_recycles_last_update_and_averages_the_rest():
    alg = FedLUAR(recycled_layers=1)
    model = tiny_model()
    alg.setup(model, 4, [])
    alg.seed = 0
    x = {k: v.clone() for k, v in alg.global_state.items()}
    stale = torch.full_like(x["0.weight"], 0.25)
    alg.recycled, alg.last_update["0.weight"], alg.scores = ["0.weight"], stale.clone(), {"0.weight": 7.0}
    fresh = {k: v for k, v in x.items() if k != "0.weight"}
    a = {k: v + 1.0 for k, v in fresh.items()}
    b = {k: v - 1.0 for k, v in fresh.items()}
    instruction = alg.configure(3, [0, 1])[0]
    assert instruction.config == {"recycled": [0]}
    assert set(alg.expected_upload(3, 0, instruction)) == set(fresh)
    alg.accumulate(3, 0, Reply(a, {"num_examples": 1}))
    alg.accumulate(3, 1, Reply(b, {"num_examples": 3}))
    alg.aggregate(3)
    torch.testing.assert_close(alg.global_state["0.weight"], x["0.weight"] + stale, rtol=0, atol=0)
    assert torch.equal(alg.last_update["0.weight"], stale) and alg.scores["0.weight"] == 7.0  # not refreshed
    for k, v in fresh.items():  # the sample-weighted mean: (1·(v+1) + 3·(v−1)) / 4 = v − 0.5
        torch.testing.assert_close(alg.global_state[k], v - 0.5, rtol=0, atol=1e-6)
    delta = alg.global_state["2.weight"] - x["2.weight"]
    torch.testing.assert_close(alg.last_update["2.weight"], delta)
    expected = float(delta.double().norm()) / (float(x["2.weight"].double().norm()) + 1e-6)
    assert alg.scores["2.weight"] == pytest.approx(expected, rel=1e-12)
    assert len(alg.recycled) == 1  # R for round 4 is drawn


def test_zero_update_ablation_leaves_recycled_layers_unchanged():
    alg = FedLUAR(recycled_layers=1, recycled_update="zero")
    alg.setup(tiny_model(), 2, [])
    x = alg.global_state["0.weight"].clone()
    alg.recycled, alg.last_update["0.weight"] = ["0.weight"], torch.ones_like(x)
    alg.scores = {"0.weight": 1.0}
    alg.accumulate(0, 0, Reply({k: v for k, v in alg.global_state.items() if k != "0.weight"}, {"num_examples": 2}))
    alg.aggregate(0)
    assert torch.equal(alg.global_state["0.weight"], x)


def test_selection_probabilities_are_inverse_to_the_scores():
    rng = np.random.default_rng(0)
    draws = np.array([sample_recycled([1.0, 2.0, 4.0], 1, rng)[0] for _ in range(10000)])
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [4 / 7, 2 / 7, 1 / 7], atol=0.015)
    # a layer whose update is (almost) zero is (almost) always recycled, even at an exactly-zero score
    assert all(0 in sample_recycled([1e-9, 1.0, 1.0, 1.0], 1, rng) for _ in range(500))
    assert all(0 in sample_recycled([0.0, 1.0, 1.0], 1, rng) for _ in range(500))
    pairs = [sample_recycled([1.0, 1.0, 1.0, 1.0], 2, rng) for _ in range(200)]
    assert all(len(set(p)) == 2 for p in pairs)  # without replacement
    assert sample_recycled([3.0, 1.0, 2.0, 1.0], 2, rng, "min_score") == [1, 3]
    assert sample_recycled([3.0, 1.0, 2.0, 1.0], 2, rng, "max_score") == [0, 2]


def test_layer_draw_is_seeded_by_seed_and_round():
    def recycled_per_round(seed):
        alg = FedLUAR(recycled_layers=1)
        out = []
        sim = _sim(alg, rounds=6, seed=seed, fault_hook=lambda r, c, rep: out.append(list(alg.recycled)) or rep)
        sim.run()
        return out

    assert recycled_per_round(1) == recycled_per_round(1)
    alg = FedLUAR(recycled_layers=1)
    alg.setup(tiny_model(), 2, [])
    alg.seed, alg.scores = 5, {k: 1.0 for k in alg.kernels}
    draws = {tuple(alg._select(r)) for r in range(40)}
    assert draws == {(k,) for k in alg.kernels}  # a fresh draw per round...
    assert all(alg._select(r) == alg._select(r) for r in range(40))  # ...that is a function of (seed, round)


def test_score_is_update_norm_over_weight_norm():
    assert luar_score(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 10.0]), 0.0) == 0.5
    assert luar_score(torch.tensor([3.0, 4.0]), torch.zeros(2)) == pytest.approx(5 / 1e-6)


@pytest.mark.parametrize("cap", [None, 1])
def test_resume_continues_to_the_same_result(tmp_path, cap):
    straight = _sim(FedLUAR(recycled_layers=1, max_consecutive=cap), rounds=6, dropout=0.2)
    full = straight.run()
    _sim(FedLUAR(recycled_layers=1, max_consecutive=cap), rounds=3, dropout=0.2, checkpoint_dir=tmp_path).run()
    resumed = _sim(FedLUAR(recycled_layers=1, max_consecutive=cap), rounds=6, dropout=0.2, checkpoint_dir=tmp_path)
    history = resumed.run(resume=True)
    assert _strip(history.rounds) == _strip(full.rounds)
    a, b = straight.algorithm, resumed.algorithm
    assert a.recycled == b.recycled and a.scores == b.scores and a.streak == b.streak
    for k, v in a.global_state.items():
        assert torch.equal(v, b.global_state[k])
    for k, v in a.last_update.items():
        assert torch.equal(v, b.last_update[k])


@pytest.mark.parametrize(
    "options, match",
    [
        ({"recycled_layers": -1}, "recycled_layers=-1 .*>= 0"),
        ({"recycled_layers": 1.5}, "recycled_layers"),
        ({"recycled_layers": 1.0}, r"recycled_layers=1.0 .*fraction .*\[0, 1\)"),
        ({"recycled_layers": -0.5}, "recycled_layers"),
        ({"max_consecutive": 1.5}, "max_consecutive"),
        ({"max_consecutive": True}, "max_consecutive"),
        ({"recycled_layers": True}, "recycled_layers"),
        ({"score_eps": -1e-6}, "score_eps.*>= 0"),
        ({"selection": "largest"}, "selection.*inverse_score"),
        ({"recycled_update": "none"}, "recycled_update.*last"),
        ({"weighting": "by-vibes"}, "weighting"),
        ({"delta": 3}, "fedluar"),
    ],
)
def test_bad_options_raise_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        make_algorithm("fedluar", **options)


def test_too_many_recycled_layers_for_the_model():
    with pytest.raises(ConfigError, match=r"recycled_layers=2 .*2 kernel tensors.*0 <= recycled_layers <= 1"):
        _sim(make_algorithm("fedluar", recycled_layers=2))
    with pytest.raises(ConfigError, match=r"recycled_layers=12 .*2 kernel tensors.*fraction"):
        _sim(make_algorithm("fedluar", recycled_layers=12))  # the official ResNet-20 count needs a larger model


@pytest.mark.parametrize("fraction, kernels, delta", [(0.5, 4, 2), (0.5, 21, 10), (0.5, 2, 1), (0.5, 1, 0),
                                                      (0.25, 7, 1), (0.0, 5, 0), (0.99, 3, 2)])  # fmt: skip
def test_fractional_recycled_layers_is_a_share_of_the_kernels(fraction, kernels, delta):
    assert recycled_count(fraction, kernels) == delta  # ⌊f·K⌋, always < K
    assert recycled_count(3, 4) == 3


def test_default_recycled_layers_fits_a_small_model():
    seen = []
    alg = make_algorithm("fedluar")  # default: half of the kernels, here 1 of the tiny model's 2
    sim = _sim(alg, rounds=4, fault_hook=lambda r, c, rep: seen.append((r, set(rep.arrays))) or rep)
    sim.run()
    assert alg.delta == 1 and len(alg.kernels) == 2
    for r, names in seen:
        assert len(set(alg.kernels) - names) == (0 if r == 0 else 1)

    def one_kernel():
        return torch.nn.Sequential(torch.nn.Linear(6, 3))

    lone = make_algorithm("fedluar")  # 1 kernel: ⌊0.5⌋ = 0 recycled, i.e. FedAvg
    Simulator(lone, one_kernel, tiny_data(4), num_clients=4, clients_per_round=2, rounds=2, local_steps=2,
              batch_size=8, lr=0.1).run()  # fmt: skip
    assert lone.delta == 0 and lone.recycled == []


def _constructed_round(alg, r):
    """One round in which every client returns the global model unchanged for kernel 0 (its score is 0, so the
    paper's rule recycles it whenever it may) and a moved kernel 1."""
    k0, k1 = alg.kernels
    fresh = {k: v.clone() for k, v in alg.global_state.items() if k not in alg.recycled}
    if k1 in fresh:
        fresh[k1] = fresh[k1] + 0.1
    alg.accumulate(r, 0, Reply(fresh, {"num_examples": 1}))
    alg.aggregate(r)
    return list(alg.recycled)


def test_max_consecutive_caps_how_long_a_layer_stays_recycled():
    paper, capped = FedLUAR(recycled_layers=1), FedLUAR(recycled_layers=1, max_consecutive=2)
    for alg in (paper, capped):
        alg.setup(tiny_model(), 2, [])
        alg.seed = 0
    k0, k1 = paper.kernels
    assert [_constructed_round(paper, r) for r in range(8)] == [[k0]] * 8  # stale score 0: recycled forever
    got = [_constructed_round(capped, r) for r in range(8)]
    assert got == [[k0], [k0], [k1], [k0], [k0], [k1], [k0], [k0]]  # R_1..R_8: at most 2 in a row, then fresh
    assert capped.streak == {k0: 1, k1: 0}  # after round 7 (R_7 = [k0])
    # in a simulation: no kernel is recycled more than k rounds in a row, and the cap survives a resume
    for k in (1, 2):
        alg, per_round = FedLUAR(recycled_layers=1, max_consecutive=k), {}

        def hook(r, cid, reply, alg=alg, per_round=per_round):
            per_round[r] = set(alg.recycled)  # R_r, the same for every client of round r
            return reply

        _sim(alg, rounds=12, fault_hook=hook).run()
        assert sum(len(v) for v in per_round.values()) == 11  # one kernel recycled in every round but the first
        for name in alg.kernels:
            run = longest = 0
            for r in sorted(per_round):
                run = run + 1 if name in per_round[r] else 0
                longest = max(longest, run)
            assert longest <= k, (name, k)
    with pytest.raises(ConfigError, match="max_consecutive=0 .*>= 1"):
        make_algorithm("fedluar", max_consecutive=0)
