import math

import pytest
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.lowrank import (
    DynamicRankSchedule,
    EffectiveRankLogger,
    LowRankAdapter,
    LowRankConv2d,
    LowRankLinear,
    official_events,
)
from leantrain.train.loop import Trainer
from leantrain.train.tasks import ClassificationTask


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def test_official_events_are_the_code_schedule_scaled():
    assert official_events(150) == [(0, "lowrank"), (55, "full"), (120, "adapter")]
    assert official_events(15) == [(0, "lowrank"), (6, "full"), (12, "adapter")]
    assert official_events(12, deflate="svd") == [(0, "lowrank"), (4, "full"), (10, "lowrank")]
    with pytest.raises(ConfigError, match="too short"):
        official_events(2)


@pytest.mark.parametrize(
    "events, message",
    [
        ([(1, "lowrank")], "start at epoch 0"),
        ([(0, "lowrank"), (3, "full"), (3, "adapter")], "strictly increasing"),
        ([(0, "sparse")], "phase 'sparse'"),
        ([(0, "lowrank"), (-1, "full")], "epoch -1"),
        ([(0,)], "pairs"),
    ],
)
def test_bad_events_are_refused(events, message):
    with pytest.raises(ConfigError, match=message):
        DynamicRankSchedule(events)


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="exactly one"):
        DynamicRankSchedule()
    for ratio in (0, 1.5, -0.1, True):
        with pytest.raises(ConfigError, match=r"rank_ratio.*\(0, 1\]"):
            DynamicRankSchedule(epochs=10, rank_ratio=ratio)
    with pytest.raises(ConfigError, match="alpha"):
        DynamicRankSchedule(epochs=10, alpha=0)
    with pytest.raises(ConfigError, match="no layer"):
        DynamicRankSchedule(epochs=10, layers=lambda n, m: False).apply(_cnn(), 0)


def test_switches_happen_exactly_at_the_event_epochs_and_preserve_the_function():
    model = _cnn().eval()
    schedule = DynamicRankSchedule([(0, "lowrank"), (2, "full"), (4, "adapter"), (6, "full")],
                                   layers=["0", "3", "8"], rank_ratio=0.5)  # fmt: skip
    x = torch.randn(3, 2, 6, 6)
    changes = {}
    for epoch in range(8):
        before = model(x).detach() if epoch else None
        phase = schedule.apply(model, epoch)
        if phase is not None:
            changes[epoch] = phase
            if epoch:  # every switch but the first is exact
                torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
        # some training in between so the weights are not the fresh ones
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    assert changes == {0: "lowrank", 2: "full", 4: "adapter", 6: "full"}
    assert schedule.switches == [{"epoch": e, "phase": p} for e, p in changes.items()]
    assert schedule.target_layers == ["0", "3", "8"] and schedule.ranks == {"0": 4, "3": 4, "8": 2}
    assert type(model[3]) is nn.Conv2d and model[3].weight.requires_grad


def test_phase_modules_and_trainable_weights():
    model = _cnn()
    schedule = DynamicRankSchedule([(0, "lowrank"), (1, "full"), (2, "adapter")], layers=["3", "8"])
    schedule.apply(model, 0)
    assert isinstance(model[3], LowRankConv2d) and isinstance(model[8], LowRankLinear) and model[3].rank == 4
    schedule.apply(model, 1)
    assert type(model[3]) is nn.Conv2d and type(model[8]) is nn.Linear
    schedule.apply(model, 2)
    assert isinstance(model[3], LowRankAdapter) and model[3].scaling == 16 / 4
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"3.base.weight", "8.base.weight", "8.base.bias"}


def test_first_lowrank_phase_starts_random_or_from_the_svd():
    dense = _cnn()
    w = dense[3].weight.detach().flatten(1)
    u, s, vh = torch.linalg.svd(w)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    random_start = _cnn()
    DynamicRankSchedule(epochs=10, layers=["3"]).apply(random_start, 0)
    svd_start = _cnn()
    DynamicRankSchedule(epochs=10, layers=["3"], init="svd").apply(svd_start, 0)
    torch.testing.assert_close(svd_start[3].composed_weight().flatten(1), best, atol=1e-5, rtol=1e-4)
    assert (random_start[3].composed_weight().flatten(1) - best).norm() > 0.5 * best.norm()


def test_svd_deflation_truncates_to_the_best_rank_r_weight():
    model = _cnn()
    schedule = DynamicRankSchedule([(0, "full"), (1, "lowrank")], layers=["3"], rank_ratio=0.25)
    schedule.apply(model, 0)
    w = model[3].weight.detach().flatten(1).double()
    s = torch.linalg.svdvals(w)
    schedule.apply(model, 1)
    err = (model[3].composed_weight().flatten(1).double() - w).norm()
    assert math.isclose(err.item(), s[2:].pow(2).sum().sqrt().item(), rel_tol=1e-4)


def _batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 2, 6, 6, generator=g)
    y = torch.randint(0, 4, (24,), generator=g)
    return [{"x": x[i : i + 8], "labels": y[i : i + 8]} for i in range(0, 24, 8)]


def test_as_a_loop_callback_it_rebuilds_the_optimizer_at_each_switch():
    model = _cnn()
    built = []

    def factory(m):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        built.append((opt, {id(p) for p in m.parameters() if p.requires_grad}))
        return opt

    schedule = DynamicRankSchedule([(0, "lowrank"), (2, "full"), (4, "adapter")], layers=["3", "8"],
                                   optimizer_factory=factory)  # fmt: skip
    schedule.apply(model, 0)
    ranks = EffectiveRankLogger(lambda: schedule.target_layers)
    trainer = Trainer(model, factory(model), ClassificationTask(), _batches(), epochs=5,
                      callbacks=[schedule, ranks])  # fmt: skip
    trainer.fit()
    assert len(built) == 3  # the initial optimizer, then one per switch (epochs 2 and 4)
    assert trainer.optimizer is built[-1][0]
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == built[-1][1]
    assert all(g["initial_lr"] == 0.05 for g in trainer.optimizer.param_groups)
    assert [r["epoch"] for r in ranks.history] == [0, 1, 2, 3, 4, 5]
    # the low-rank phase caps the effective rank at r; the full phase lets it exceed r
    assert all(r["erank/3"] <= 4 + 1e-6 for r in ranks.history[:2])
    assert ranks.history[4]["erank/3"] > 4
    assert all(math.isfinite(p.detach().sum().item()) for p in model.parameters())


def test_loop_callback_without_a_factory_says_what_is_missing():
    model = _cnn()
    schedule = DynamicRankSchedule([(0, "full"), (1, "lowrank")], layers=["3"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ConfigError, match="optimizer_factory"):
        Trainer(model, opt, ClassificationTask(), _batches(), epochs=2, callbacks=[schedule]).fit()
