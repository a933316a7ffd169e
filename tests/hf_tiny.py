"""A tiny BERT classifier, its token dataset and Trainer arguments, for tests of Hugging Face Trainer adapters."""

import torch
import transformers

N = 8  # rows in the dataset


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (N, 10), generator=g)
        self.labels = (self.ids[:, 0] > 25).long()

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=50, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


def trainer_args(tmp_path, **overrides):
    """One SGD-like step on the whole dataset, no clipping, no schedule, no saving; ``overrides`` win."""
    kwargs = {"output_dir": str(tmp_path), "max_steps": 1, "per_device_train_batch_size": N, "learning_rate": 0.1,
              "report_to": [], "save_strategy": "no", "use_cpu": True, "disable_tqdm": True, "max_grad_norm": 0.0,
              "lr_scheduler_type": "constant"}  # fmt: skip
    return transformers.TrainingArguments(**{**kwargs, **overrides})
