"""(Bi)LSTM text classifier: token embeddings, a stacked LSTM (Hochreiter & Schmidhuber 1997; bidirectional
as in Schuster & Paliwal 1997) and a linear head on the final hidden states.

Padding never changes the output: the valid tokens of each row (from ``attention_mask``, or
``input_ids != pad_token_id`` when no mask is given) are moved to the front, in order, and the batch is
run as a packed sequence, so the forward direction stops at the last real token and the backward
direction starts there. Left- and right-padded batches therefore give the same logits. The sentence
representation is the concatenation of the last layer's final forward and backward hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from leantrain.models.model_config import ModelConfig, check, check_dropout, check_positive
from leantrain.models.registry import register_model


@dataclass
class LSTMClassifierConfig(ModelConfig):
    """Hyper-parameters of :class:`LSTMClassifier`."""

    vocab_size: int = field(default=30522, metadata={"help": "tokenizer vocabulary size (BERT uncased: 30522)"})
    num_classes: int = field(default=3, metadata={"help": "number of output classes"})
    embed_dim: int = field(default=128, metadata={"help": "token embedding size"})
    hidden_size: int = field(default=128, metadata={"help": "LSTM hidden size per direction"})
    num_layers: int = field(default=1, metadata={"help": "stacked LSTM layers"})
    bidirectional: bool = field(default=True, metadata={"help": "also run the LSTM right-to-left"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on embeddings, between layers, before the head"})
    pad_token_id: int = field(default=0, metadata={"help": "padding id, used when no attention_mask is given"})

    def validate(self) -> None:
        check_positive(self, "vocab_size", "num_classes", "embed_dim", "hidden_size", "num_layers")
        check(self, "pad_token_id", 0 <= self.pad_token_id < self.vocab_size, f"in [0, {self.vocab_size})")
        check_dropout(self)


class LSTMClassifier(nn.Module):
    """Embedding -> (Bi)LSTM over packed valid tokens -> concat final states -> Dropout -> Linear."""

    def __init__(self, config: LSTMClassifierConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.pad_token_id)
        self.lstm = nn.LSTM(
            config.embed_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            bidirectional=config.bidirectional,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(config.dropout)
        directions = 2 if config.bidirectional else 1
        self.head = nn.Linear(directions * config.hidden_size, config.num_classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object
    ) -> torch.Tensor:
        """``input_ids`` (B, T) and optional ``attention_mask`` (B, T) -> logits (B, num_classes).

        Extra keyword arguments (``token_type_ids``, ``labels``, ...) are accepted and ignored, so a
        tokenizer's batch can be passed as ``model(**batch)``.
        """
        mask = attention_mask.bool() if attention_mask is not None else input_ids != self.config.pad_token_id
        # Stable sort puts each row's valid tokens first, in their original order (handles left padding).
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # (B, T)
        ids = torch.gather(input_ids, 1, order)  # (B, T)
        # An all-padding row still needs one step; it sees only the pad embedding (zero at init).
        lengths = mask.sum(dim=1).clamp(min=1).cpu()  # (B,)
        x = self.drop(self.embed(ids))  # (B, T, E)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # h_n: (layers * directions, B, H)
        directions = 2 if self.config.bidirectional else 1
        final = h_n[-directions:].transpose(0, 1).reshape(input_ids.shape[0], -1)  # (B, directions * H)
        return self.head(self.drop(final))


@register_model("lstm", LSTMClassifierConfig)
def build_lstm(config: LSTMClassifierConfig) -> LSTMClassifier:
    """Build an :class:`LSTMClassifier` from its config."""
    return LSTMClassifier(config)
