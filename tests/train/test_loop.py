import json
import os
import signal

import pytest
import torch
from torch import nn

from leantrain.errors import NonFiniteLossError
from leantrain.train.checkpoint import list_checkpoints, load_checkpoint
from leantrain.train.loop import Trainer, TrainingInterrupted
from leantrain.train.schedule import lr_factor
from leantrain.train.tasks import ClassificationTask


class _Batches:
    """Deterministic shuffled batches from (seed, epoch), like leantrain.data.ArrayBatches."""

    def __init__(self, x, y, batch_size=8, seed=0):
        self.x, self.y, self.bs, self.seed, self.epoch = x, y, batch_size, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return (len(self.x) + self.bs - 1) // self.bs

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.x), generator=g)
        for i in range(0, len(order), self.bs):
            idx = order[i : i + self.bs]
            yield {"x": self.x[idx], "labels": self.y[idx]}


def _data(n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


def _trainer(model, ckpt_dir=None, callbacks=(), **kw):
    x, y = _data()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    return Trainer(
        model, opt, ClassificationTask(), _Batches(x, y), epochs=3, lr_schedule=lr_factor("cosine", 24, 3),
        eval_batches=_Batches(x, y, 32), eval_every=5, log_every=4, checkpoint_dir=ckpt_dir,
        checkpoint_every=5, callbacks=callbacks, **kw,
    )  # fmt: skip


class _CrashAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, counts):
        if trainer.state.step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("crash_step", [7, 16])  # mid-epoch and just after an epoch boundary
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, crash_step):
    straight = _model(0)
    _trainer(straight).fit()

    crashed = _model(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(crashed, tmp_path, callbacks=[_CrashAt(crash_step)]).fit()
    latest = list_checkpoints(tmp_path)[-1]
    assert json_step(latest) < crash_step  # there is lost work to redo

    resumed = _model(123)  # a different init: everything must come from the checkpoint
    trainer = _trainer(resumed, tmp_path)
    state = trainer.fit(resume_from=latest)
    assert state.step == 24 and state.epoch == 3
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def json_step(path):
    import json

    return json.loads((path / "state.json").read_text())["step"]


def test_training_reduces_loss_and_logs(tmp_path):
    records = []

    class Log:
        def log(self, r):
            records.append(r)

    model = _model(0)
    trainer = _trainer(model, logger=Log())
    x, y = _data()
    before = trainer.evaluate(_Batches(x, y))["loss"]
    trainer.fit()
    after = trainer.evaluate(_Batches(x, y))["loss"]
    assert after < 0.7 * before
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [4, 8, 12, 16, 20, 24]
    assert {"loss", "accuracy", "lr", "samples_per_s", "elapsed_s", "epoch"} <= set(train[0])
    assert train[-1]["lr"] == pytest.approx(0.01 * lr_factor("cosine", 24, 3)(23))


def test_closure_optimizer_gets_closure_and_grad_transform_runs_each_pass():
    calls = {"closure": 0, "transform": 0}

    class TwoPass(torch.optim.SGD):
        requires_closure = True

        def step(self, closure):
            closure()
            calls["closure"] += 1
            closure()
            calls["closure"] += 1
            return super().step()

    def transform(model):
        calls["transform"] += 1

    model = _model(0)
    x, y = _data(16)
    trainer = Trainer(model, TwoPass(model.parameters(), lr=0.1), ClassificationTask(), _Batches(x, y),
                      grad_transforms=[transform])  # fmt: skip
    trainer.fit()
    assert calls == {"closure": 4, "transform": 4}


def test_grad_transform_can_freeze_a_parameter():
    model = _model(0)
    frozen = model[0].weight.detach().clone()

    def zero_first(m):
        m[0].weight.grad.zero_()

    x, y = _data()
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), ClassificationTask(), _Batches(x, y),
            grad_transforms=[zero_first]).fit()  # fmt: skip
    assert torch.equal(model[0].weight, frozen)


def test_grad_clip_bounds_the_update():
    model = _model(0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _data(8)
    Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0), ClassificationTask(), _Batches(x, y),
            grad_clip=1e-3).fit()  # fmt: skip
    moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True)))
    assert 0 < moved <= 1e-3 + 1e-7


def test_nan_loss_stops_before_the_step_and_keeps_last_checkpoint(tmp_path):
    model = _model(0)

    class Poison:
        def on_step_end(self, trainer, counts):
            if trainer.state.step == 6:
                with torch.no_grad():
                    model[3].bias.fill_(float("nan"))

    trainer = _trainer(model, tmp_path, callbacks=[Poison()])
    with pytest.raises(NonFiniteLossError, match="step 7"):
        trainer.fit()
    latest = list_checkpoints(tmp_path)[-1]
    assert json_step(latest) == 5
    fresh = _model(1)
    load_checkpoint(latest, fresh, None)
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_ctrl_c_finishes_the_step_and_checkpoints(tmp_path):
    class Interrupt:
        def on_step_end(self, trainer, counts):
            if trainer.state.step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background
    trainer = _trainer(_model(0), tmp_path, callbacks=[Interrupt()])
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.checkpoint.name == "step-00000003"
    assert signal.getsignal(signal.SIGINT) is before  # the handler the loop found is back


def test_max_steps_overrides_epochs_and_crosses_epoch_boundaries():
    x, y = _data()  # 8 batches per epoch
    model = _model(0)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), ClassificationTask(), _Batches(x, y),
                      epochs=1, max_steps=20)  # fmt: skip
    state = trainer.fit()
    assert (state.step, state.epoch, state.batch_in_epoch) == (20, 2, 4)


def test_closure_reevaluations_leave_batchnorm_stats_to_the_first_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    seen = {}

    class TwoPass(torch.optim.SGD):
        requires_closure = True

        def step(self, closure):
            closure()
            seen["after_first"] = model[1].running_mean.clone(), int(model[1].num_batches_tracked)
            with torch.no_grad():  # a perturbation, as SAM makes, so the second pass sees other statistics
                model[0].weight.add_(1.0)
            closure()
            with torch.no_grad():
                model[0].weight.sub_(1.0)
            return super().step()

    x, y = _data(8)
    Trainer(model, TwoPass(model.parameters(), lr=0.0), ClassificationTask(), _Batches(x, y, batch_size=8)).fit()
    assert torch.equal(model[1].running_mean, seen["after_first"][0])
    assert int(model[1].num_batches_tracked) == seen["after_first"][1] == 1


def test_epoch_end_after_resume_rewrites_a_same_step_checkpoint(tmp_path):
    """Ctrl-C on an epoch's last batch checkpoints before the epoch ends; the resumed epoch end must re-save it."""

    class Interrupt:
        def on_step_end(self, trainer, counts):
            if trainer.state.step == 8:  # the last of 8 batches in epoch 0
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        _trainer(_model(0), tmp_path, callbacks=[Interrupt()]).fit()
    first = list_checkpoints(tmp_path)[-1]
    assert first.name == "step-00000008" and json.loads((first / "state.json").read_text())["epoch"] == 0
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(_model(1), tmp_path, callbacks=[_CrashAt(9)]).fit(resume_from=first)
    saved = json.loads((tmp_path / "step-00000008" / "state.json").read_text())
    assert (saved["epoch"], saved["batch_in_epoch"]) == (1, 0)
