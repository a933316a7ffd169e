"""On-device KD: the distillation loss and its direction, the ramp-up, the two phases (who trains what, what travels),
the teacher stays put, KD at weight 0 makes T independent of A, distillation pulls T towards A, unlabeled rows."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fl_fixtures import tiny_data, tiny_model
from torch import nn

from leantrain.errors import ConfigError
from leantrain.federated import Simulator, make_algorithm, wire_nbytes
from leantrain.federated.algorithms.base import communicated
from leantrain.federated.algorithms.ondevice_kd import PREFIX, OnDeviceKD, kd_loss, scaled_copy
from leantrain.federated.simulator import FederatedData, federated_data
from leantrain.models import build_model


def small_aux():
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))


def kd_data(num_clients=4, per_client=24):
    """tiny_data plus, for every client, 12 unlabeled rows (the last 12 of its part are labeled too: only the
    partition bookkeeping matters here)."""
    base = tiny_data(num_clients, per_client)
    labeled = [p[:12] for p in base.parts]
    unlabeled = [p[12:] for p in base.parts]
    return FederatedData(base.train, base.test, labeled, base.num_classes, base.input_shape, unlabeled)


def kd_sim(algorithm, **kw):
    args = dict(num_clients=4, clients_per_round=2, rounds=2, local_steps=3, batch_size=6, lr=0.1,
                devices={"weak": 0.5}, engine="sequential", seed=1)  # fmt: skip
    args.update(kw)
    return Simulator(algorithm, tiny_model, kd_data(args["num_clients"]), **args)


def test_kd_loss_is_temperature_squared_kl_teacher_to_student():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    pt, ps = F.softmax(t / 3, -1), F.softmax(s / 3, -1)
    manual = 9 * (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert torch.allclose(kd_loss(s, t, 3.0), manual, atol=1e-6)
    reverse = 9 * (ps * (ps.log() - pt.log())).sum(-1).mean()
    assert not torch.allclose(kd_loss(s, t, 3.0), reverse, atol=1e-3)  # the direction matters, and it is teacher->
    assert float(kd_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-7)


def test_rampup_follows_the_official_schedule():
    kd = OnDeviceKD(aux_model=small_aux, kd_weight=0.5, rampup_rounds=300)
    assert kd.kd_weight_at(0) == pytest.approx(0.5 * math.exp(-5))
    assert kd.kd_weight_at(150) == pytest.approx(0.5 * math.exp(-5 * 0.25))
    assert kd.kd_weight_at(300) == kd.kd_weight_at(1000) == 0.5
    weights = [kd.kd_weight_at(r) for r in range(0, 320, 10)]
    assert weights == sorted(weights)
    assert OnDeviceKD(aux_model=small_aux, rampup_rounds=0).kd_weight_at(0) == 0.5


def test_phases_cohorts_and_bytes():
    kd = OnDeviceKD(aux_model=small_aux)
    sim = kd_sim(kd, rounds=1)
    strong = [c for c in range(4) if sim.device_names[c] == "strong"]
    assert len(strong) == 2
    row = sim.run().rounds[0]
    assert row["phases"]["aux"]["cohort"] == 2 and row["phases"]["target"]["cohort"] == len(strong)
    a_bytes = sum(wire_nbytes(v) for v in kd._aux_arrays().values())
    t_bytes = sum(wire_nbytes(v) for v in kd._target_arrays().values())
    assert a_bytes < t_bytes
    from leantrain.federated.comm import config_nbytes

    aux_cfg = config_nbytes({"phase": "aux"})
    target_cfg = config_nbytes({"phase": "target", "kd_weight": kd.kd_weight_at(0)})
    assert row["down_bytes"] == 2 * (a_bytes + aux_cfg) + len(strong) * (t_bytes + a_bytes + target_cfg)
    assert row["up_bytes"] == 2 * a_bytes + len(strong) * t_bytes


def test_excluding_weak_clients_and_sampling_strong_ones():
    sim = kd_sim(OnDeviceKD(aux_model=small_aux, aux_clients="strong", strong_per_round=1), rounds=3)
    weak = {c for c in range(4) if sim.device_names[c] == "weak"}
    seen = []
    original = sim._run_phase

    def spy(r, cohort):
        seen.append((sim.algorithm.phase, list(cohort)))
        return original(r, cohort)

    sim._run_phase = spy
    sim.run()
    assert all(not set(c) & weak for _, c in seen)
    assert all(len(c) == 1 for phase, c in seen if phase == "target")


def test_teacher_is_not_trained_in_the_target_phase_and_weight_zero_ignores_it():
    kd = OnDeviceKD(aux_model=small_aux, kd_weight=0.0)
    sim = kd_sim(kd, rounds=1)
    kd.begin_phase(0, "target")
    cohort = kd.sample(0, 2, np.random.default_rng(0), list(range(4)))
    aux_before = {k: v.clone() for k, v in kd.aux_state().items()}
    sim._run_phase(0, cohort)
    assert all(torch.equal(aux_before[k], v) for k, v in kd.aux_state().items())  # phase 2 leaves A alone
    target_a = {k: v.clone() for k, v in kd.eval_state().items()}

    # the same target phase with a different teacher: at kd_weight 0, T does not depend on A
    kd2 = OnDeviceKD(aux_model=small_aux, kd_weight=0.0)
    sim2 = kd_sim(kd2, rounds=1)
    kd2.global_state.update({PREFIX + k: torch.randn_like(v) for k, v in kd2.aux_state().items()})
    kd2.begin_phase(0, "target")
    sim2._run_phase(0, cohort)
    assert all(torch.equal(target_a[k], v) for k, v in kd2.eval_state().items())


def test_distillation_pulls_the_target_towards_the_teacher():
    data = kd_data()
    x = data.train["x"]

    def disagreement(kd):
        model = tiny_model()
        model.load_state_dict(kd.eval_state())
        teacher = small_aux()
        teacher.load_state_dict(kd.aux_state())
        with torch.no_grad():
            return float(kd_loss(model(x), teacher(x), 3.0))

    results = {}
    for weight in (0.0, 5.0):
        kd = OnDeviceKD(aux_model=small_aux, kd_weight=weight, rampup_rounds=0, kd_steps=30)
        sim = kd_sim(kd, rounds=1, lr=0.05)
        torch.manual_seed(5)
        kd.global_state.update({PREFIX + k: torch.randn_like(v) * 2 for k, v in kd.aux_state().items()})
        kd.begin_phase(0, "target")
        sim._run_phase(0, [c for c in range(4) if sim.device_names[c] == "strong"])
        results[weight] = disagreement(kd)
    assert results[5.0] < 0.5 * results[0.0]


def test_end_to_end_improves_the_target_model():
    kd = OnDeviceKD(aux_model=small_aux, rampup_rounds=5)
    sim = kd_sim(kd, rounds=15, clients_per_round=4)
    before = sim.evaluate()["loss"]
    history = sim.run()
    assert history.last("test_loss") < 0.8 * before
    assert all(r["phases"]["target"]["responded"] == 2 for r in history.rounds)


def test_default_aux_model_is_the_target_scaled():
    cnn = build_model("cnn", channels=[32, 64], hidden=128, input_shape=(1, 28, 28))
    aux = scaled_copy(cnn, 0.25)
    assert aux.config.channels == (8, 16) and aux.config.hidden == 32
    n = sum(p.numel() for p in aux.parameters()) / sum(p.numel() for p in cnn.parameters())
    assert n < 0.1
    kd = OnDeviceKD()
    kd.setup(cnn, 4, [])
    assert 0 < kd.aux_work < 0.15 and any(k.startswith(PREFIX) for k in communicated(kd.global_state))


def test_unlabeled_share_splits_rows_disjointly_to_holders():
    data = federated_data("digits", "dirichlet", 10, seed=0, alpha=0.5, unlabeled_share=0.4,
                          unlabeled_holders=[0, 3])  # fmt: skip
    labeled = np.concatenate(data.parts)
    unlabeled = np.concatenate(data.unlabeled_parts)
    assert len(np.intersect1d(labeled, unlabeled)) == 0
    assert len(labeled) + len(unlabeled) == len(data.train["labels"])
    assert 0.3 < len(unlabeled) / len(data.train["labels"]) < 0.5
    assert [c for c in range(10) if len(data.unlabeled_parts[c])] == [0, 3]


def test_bad_options():
    for bad in ({"temperature": 0}, {"aux_clients": "weak"}, {"teacher_mode": "x"}, {"kd_weight": -1},
                {"strong_per_round": 1.5}, {"aux_model": {"channels": 3}}, {"strong_profiles": "strong"}):  # fmt: skip
        with pytest.raises(ConfigError):
            make_algorithm("kd", **bad)
