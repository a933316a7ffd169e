"""VAR under the Hugging Face Trainer (PenalizedTrainer) takes the step of loss + penalty."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_tiny import N, trainer_args  # noqa: E402
from hf_tiny import Tokens as _Tokens  # noqa: E402
from hf_tiny import tiny_bert as _bert  # noqa: E402
from leantrain.errors import ConfigError  # noqa: E402
from leantrain.prune import VarianceAmplifyingRegularizer  # noqa: E402
from leantrain.prune.hf_trainer import PenalizedTrainer  # noqa: E402


def _trained(tmp_path, accumulation, lam):
    model = _bert()
    args = trainer_args(
        tmp_path,
        optim="sgd",
        weight_decay=0.0,
        per_device_train_batch_size=N // accumulation,
        gradient_accumulation_steps=accumulation,
    )
    penalty = VarianceAmplifyingRegularizer(model, lam=lam)
    PenalizedTrainer(model=model, args=args, train_dataset=_Tokens(), penalty=penalty).train()
    return model


@pytest.mark.parametrize("accumulation", [1, 2])
def test_one_trainer_step_adds_exactly_one_penalty_gradient(tmp_path, accumulation):
    """SGD without momentum: (step with penalty) - (step without) = -lr * lam * grad(psi), once per optimizer step."""
    lam, lr = 1e-3, 0.1
    with_penalty = _trained(tmp_path, accumulation, lam)
    without = _trained(tmp_path, accumulation, 0.0)
    start = _bert()
    psi = VarianceAmplifyingRegularizer(start, lam=1.0)()
    psi.backward()
    checked = 0
    for (name, p), q, s0 in zip(
        with_penalty.named_parameters(), without.parameters(), start.parameters(), strict=True
    ):
        expected = -lr * lam * s0.grad if s0.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(p - q, expected, rtol=1e-3, atol=1e-7, msg=name)
        checked += int(s0.grad is not None and s0.grad.abs().max() > 0)
    assert checked > 0


def test_the_plain_step_is_the_stock_trainer_step(tmp_path):
    model, stock = _bert(), _bert()
    args = trainer_args(tmp_path, optim="sgd", weight_decay=0.0)
    PenalizedTrainer(model=model, args=args, train_dataset=_Tokens(), penalty=lambda: torch.zeros(())).train()
    transformers.Trainer(model=stock, args=args, train_dataset=_Tokens()).train()
    for p, q in zip(model.parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_refuses_a_penalty_that_is_not_callable(tmp_path):
    with pytest.raises(ConfigError, match="penalty"):
        PenalizedTrainer(model=_bert(), args=trainer_args(tmp_path, optim="sgd", weight_decay=0.0), penalty=0.1)
