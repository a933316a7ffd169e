"""VAR under the Hugging Face Trainer (PenalizedTrainer) takes the step of loss + penalty."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from leantrain.errors import ConfigError  # noqa: E402
from leantrain.prune import VarianceAmplifyingRegularizer  # noqa: E402
from leantrain.prune.hf_trainer import PenalizedTrainer  # noqa: E402

N = 8


class _Tokens(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (N, 10), generator=g)
        self.labels = (self.ids[:, 0] > 25).long()

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=50, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, learning_rate=0.1, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, max_grad_norm=0.0, lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, **kw,
    )  # fmt: skip


def _trained(tmp_path, accumulation, lam):
    model = _bert()
    args = _args(tmp_path, per_device_train_batch_size=N // accumulation, gradient_accumulation_steps=accumulation)
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
    model = _bert()
    PenalizedTrainer(model=model, args=_args(tmp_path, per_device_train_batch_size=N), train_dataset=_Tokens(),
                     penalty=lambda: torch.zeros(())).train()  # fmt: skip
    stock = _bert()
    transformers.Trainer(model=stock, args=_args(tmp_path, per_device_train_batch_size=N),
                         train_dataset=_Tokens()).train()  # fmt: skip
    for p, q in zip(model.parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_refuses_a_penalty_that_is_not_callable(tmp_path):
    with pytest.raises(ConfigError, match="penalty"):
        PenalizedTrainer(model=_bert(), args=_args(tmp_path), penalty=0.1)
