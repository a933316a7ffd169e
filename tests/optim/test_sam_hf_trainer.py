"""SAM under the Hugging Face Trainer (SharpnessAwareTrainer) takes exactly the step SAM.step(closure) takes."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_tiny import Tokens as _Tokens  # noqa: E402
from hf_tiny import tiny_bert as _bert  # noqa: E402
from hf_tiny import trainer_args  # noqa: E402
from leantrain.errors import ConfigError  # noqa: E402
from leantrain.optim import SAM  # noqa: E402
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


def test_refuses_a_plain_optimizer_and_gradient_accumulation(tmp_path):
    model = _bert()
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SharpnessAwareTrainer(
        model=model, args=trainer_args(tmp_path), train_dataset=_Tokens(), optimizers=(plain, None)
    )
    with pytest.raises(ConfigError, match="needs a leantrain SAM optimizer"):
        trainer.train()
    sam = SAM(model.parameters(), rho=0.05, lr=0.1)
    args = trainer_args(tmp_path, gradient_accumulation_steps=2)
    trainer = SharpnessAwareTrainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(sam, None))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=1 only"):
        trainer.train()


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
