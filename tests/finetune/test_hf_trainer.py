"""GEM and PaCA models train under the Hugging Face ``Trainer`` as well as under leantrain's loop."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from peft import get_peft_model  # noqa: E402

from leantrain.finetune import GemConfig, PacaConfig, apply_gem  # noqa: E402


class _Tokens(torch.utils.data.Dataset):
    """A learnable toy task: the label is whether token 7 occurs in the sequence."""

    def __init__(self, n=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 50, (n, 12), generator=g)
        self.ids[: n // 2, 3] = 7
        self.labels = (self.ids == 7).any(1).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.labels[i]}


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=50, max_position_embeddings=16)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


def _fit(model, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
        save_strategy="no", use_cpu=True, logging_steps=100, disable_tqdm=True, seed=0,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=_Tokens()).train()


def _frozen_and_adapter(model, prefix):
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if prefix in n}
    return frozen, adapter


@pytest.mark.parametrize("method", ["paca", "gem"])
def test_trainer_updates_only_the_adapter(method, tmp_path):
    if method == "paca":
        model = get_peft_model(_bert(), PacaConfig(r=4, paca_alpha=8, target_modules=["query", "value"]))
        prefix = "paca_delta"
    else:
        batches = [{k: torch.stack([_Tokens()[i][k] for i in range(8)]) for k in ("input_ids", "labels")}]
        model = apply_gem(_bert(), batches, GemConfig(density=0.05, target_modules=["query", "value", "dense"]))
        prefix = "gem_values"
    frozen, adapter = _frozen_and_adapter(model, prefix)
    assert adapter and frozen
    _fit(model, tmp_path)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
    assert any(not torch.equal(after[n], p) for n, p in adapter.items())
