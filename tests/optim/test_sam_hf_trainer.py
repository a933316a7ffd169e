"""SAM under the Hugging Face Trainer (SharpnessAwareTrainer) takes exactly the step SAM.step(closure) takes."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_tiny import Tokens as _Tokens  # noqa: E402
from hf_tiny import tiny_bert as _bert  # noqa: E402
from hf_tiny import trainer_args  # noqa: E402
from leantrain.errors import ConfigError  # noqa: E402
from leantrain.optim import SAM, LayerwiseSAM  # noqa: E402
from leantrain.optim.hf_trainer import SharpnessAwareTrainer  # noqa: E402


def test_one_trainer_step_equals_sam_step(tmp_path):
    model = _bert()
    sam = SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=0.5, lr=0.1)
    SharpnessAwareTrainer(
        model=model, args=trainer_args(tmp_path), train_dataset=_Tokens(), optimizers=(sam, None)
    ).train()

    reference = _bert()
    ref_opt = SAM(reference.parameters(), base_optimizer=torch.optim.SGD, rho=0.5, lr=0.1)
    data = _Tokens()
    batch = {"input_ids": data.ids, "labels": data.labels}

    def closure():
        ref_opt.zero_grad()
        loss = reference(**batch).loss
        loss.backward()
        return loss

    reference.train()
    ref_opt.step(closure)
    moved = 0
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(p, _bert().get_parameter(name)))
    assert moved > 0


def test_refuses_a_plain_optimizer(tmp_path):
    model = _bert()
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SharpnessAwareTrainer(
        model=model, args=trainer_args(tmp_path), train_dataset=_Tokens(), optimizers=(plain, None)
    )
    with pytest.raises(ConfigError, match="needs a leantrain SAM optimizer"):
        trainer.train()


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("kind", ["sam", "lwsam"])
def test_gradient_accumulation_equals_one_batch_of_the_whole_window(tmp_path, kind):
    """2 micro-batches of 4 give the weights of 1 batch of 8: ascent over the window, one ε, descent over it.

    ``accepts_loss_kwargs = False``: the Trainer then divides each micro-batch's mean loss by N itself. Left at
    the default, BERT's ``forward(**kwargs)`` makes the Trainer believe the model normalizes by
    ``num_items_in_batch``, which its classification loss does not: the stock Trainer with plain SGD then sums the
    micro-batch means (an N times larger step), and SharpnessAwareTrainer inherits that scaling unchanged.
    """

    def run(accumulation, batch_size):
        model = _bert()
        model.accepts_loss_kwargs = False
        opt = (
            LayerwiseSAM(model, num_layers=1, rho=0.5, lr=0.1)
            if kind == "lwsam"
            else SAM(model.parameters(), rho=0.5, lr=0.1)
        )
        forwards = []
        model.register_forward_hook(lambda *_: forwards.append(1))
        args = trainer_args(tmp_path, max_steps=2, gradient_accumulation_steps=accumulation,
                            per_device_train_batch_size=batch_size)  # fmt: skip
        SharpnessAwareTrainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, None)).train()
        return _flat(model), len(forwards)

    window, forwards = run(2, 4)
    whole, whole_forwards = run(1, 8)
    assert (forwards, whole_forwards) == (8, 4)  # per step: N ascent forwards, then N descent forwards
    torch.testing.assert_close(window, whole, rtol=0, atol=1e-6)
    assert not torch.equal(whole, _flat(_bert()))


@pytest.mark.parametrize("kind", ["sam", "lwsam"])
@pytest.mark.parametrize("overflow_in", ["ascent", "descent"])
def test_a_gradient_overflow_skips_the_step_and_restores_the_weights(tmp_path, kind, overflow_in):
    """fp16 path: the scaler skips ``optimizer.step()`` on inf; the model is back at w, bit-exactly, and training
    goes on (before the fix every later step raised "first_step was called twice").

    accelerate builds no GradScaler on CPU even with ``fp16=True``, so the test gives the Trainer's accelerator
    a CPU ``torch.amp.GradScaler``: the Trainer then scales the backward and steps through ``scaler.step`` as with
    fp16 on a GPU. The forwards stay fp32 and the scale is a power of 2, so unscaled gradients are exact.
    """

    def make():
        model = _bert()
        opt = (
            LayerwiseSAM(model, num_layers=1, rho=0.5, lr=0.1)
            if kind == "lwsam"
            else SAM(model.parameters(), rho=0.5, lr=0.1)
        )
        return model, opt

    model, sam = make()
    w0 = _flat(model)
    forwards = []

    def overflow(module, args, output):
        forwards.append(1)
        if len(forwards) == (1 if overflow_in == "ascent" else 2):  # step 1's first or second pass
            output.loss.register_hook(lambda g: g * float("inf"))  # finite loss, inf/NaN gradients

    model.register_forward_hook(overflow)
    after_step = []

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            after_step.append((_flat(model), sam.last_step_skipped, sam.perturbed))

    args = trainer_args(tmp_path, max_steps=3)
    trainer = SharpnessAwareTrainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(sam, None))
    trainer.add_callback(Record())
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    trainer.train()

    assert len(forwards) == (5 if overflow_in == "ascent" else 6)  # no second pass after an ascent overflow
    weights, skipped, perturbed = after_step[0]
    assert torch.equal(weights, w0) and skipped and not perturbed  # before eval/save could see w + ε
    assert [s for _, s, _ in after_step[1:]] == [False, False]
    assert trainer.accelerator.scaler.get_scale() == 2.0**3
    assert all(p.requires_grad for p in model.parameters())

    reference, ref_opt = make()  # the two steps that were taken
    data = _Tokens()
    reference.train()

    def closure():
        ref_opt.zero_grad()
        loss = reference(input_ids=data.ids, labels=data.labels).loss
        loss.backward()
        return loss

    ref_opt.step(closure)
    ref_opt.step(closure)
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-5, atol=1e-6)


def test_asyncsam_with_an_ascent_takes_one_pass_per_trainer_step(tmp_path):
    """Under SharpnessAwareTrainer, AsyncSAM with an Ascent equals its own step(closure): one pass at w + ε."""
    from leantrain.optim import Ascent, AsyncSAM

    data = _Tokens()
    rows = {"input_ids": data.ids, "labels": data.labels}

    def loss_fn(model, batch):
        return model(**batch).loss

    def make():
        model = _bert()
        return model, AsyncSAM(model.parameters(), rho=0.5, lr=0.1, model=model, staleness=0,
                               ascent=Ascent(loss_fn, rows, batch_size=4, seed=1))  # fmt: skip

    model, opt = make()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    SharpnessAwareTrainer(model=model, args=trainer_args(tmp_path), train_dataset=data, optimizers=(opt, None)).train()

    reference, ref_opt = make()
    reference.train()

    def closure():
        ref_opt.zero_grad()
        loss = reference(**rows).loss
        loss.backward()
        return loss

    ref_opt.step(closure)
    assert len(calls) == 2  # the in-process ascent (b' = 4) and the one descent pass
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_mlbfgs_is_a_plain_optimizer_for_the_trainer(tmp_path):
    """MLBFGS needs no adapter: the stock Trainer's steps equal a hand loop of backward + step()."""
    from leantrain.optim import MLBFGS

    data = _Tokens()
    kw = {"lr": 0.05, "momentum": 0.9, "update_freq": 1, "history_size": 3}
    model = _bert()
    opt = MLBFGS(model.parameters(), **kw)
    args = trainer_args(tmp_path)
    args.max_steps = 4
    transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
    assert any(st.get("hist_s") is not None and len(st["hist_s"]) for st in opt.state.values())  # pairs were built

    reference = _bert()
    ref_opt = MLBFGS(reference.parameters(), **kw)
    reference.train()
    for _ in range(4):
        ref_opt.zero_grad()
        reference(input_ids=data.ids, labels=data.labels).loss.backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lwsam_warmup_steps_take_one_pass_under_the_trainer(tmp_path):
    model = _bert()
    opt = LayerwiseSAM(model, num_layers=1, rho=0.5, lr=0.1, select_after=1)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    args = trainer_args(tmp_path, max_steps=2, per_device_train_batch_size=8)
    SharpnessAwareTrainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, None)).train()
    assert len(forwards) == 3  # warm-up step: one pass; then two
    assert opt.step_count == 2 and opt.selected_at == 1
