"""Small GPT decoder after nanoGPT (Karpathy), i.e. GPT-2 ("Language Models are Unsupervised Multitask
Learners", Radford et al. 2019) at toy scale, for character- or token-level language modelling.

Pre-LayerNorm transformer blocks (causal multi-head self-attention, then a 4x GELU MLP, each with a
residual connection), learned absolute position embeddings, a final LayerNorm and an output head tied
to the token embedding. Initialisation follows GPT-2: N(0, 0.02) weights, zero biases, and the
residual output projections scaled by 1/sqrt(2 * n_layer). Attention uses
``F.scaled_dot_product_attention(is_causal=True)``.

Departures from nanoGPT: ``forward`` returns logits only (the trainer owns the loss), and ``generate``
takes a ``torch.Generator`` for reproducible sampling and treats ``temperature=0`` as greedy decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from leantrain.errors import ConfigError
from leantrain.models.model_config import ModelConfig, check, check_dropout, check_positive
from leantrain.models.registry import register_model


@dataclass
class GPTConfig(ModelConfig):
    """Hyper-parameters of :class:`GPT` (defaults: a 0.8M-parameter character model)."""

    vocab_size: int = field(default=65, metadata={"help": "token vocabulary size (65 for tiny-shakespeare chars)"})
    block_size: int = field(default=128, metadata={"help": "maximum context length in tokens"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads; must divide n_embd"})
    n_embd: int = field(default=128, metadata={"help": "embedding / residual stream width"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on embeddings, attention and residuals"})
    bias: bool = field(default=True, metadata={"help": "biases in Linear and LayerNorm layers (GPT-2: True)"})

    def validate(self) -> None:
        check_positive(self, "vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        check(self, "n_embd", self.n_embd % self.n_head == 0, f"a multiple of n_head={self.n_head}")
        check_dropout(self)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions <= t only."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(C, 4C) -> GELU -> Linear(4C, C) -> Dropout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model with tied input/output embeddings."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017), as in GPT-2
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor | None = None, *, input_ids: torch.Tensor | None = None, **_: object
    ) -> torch.Tensor:
        """``idx`` (B, T) token ids with T <= block_size -> next-token logits (B, T, vocab_size).

        ``input_ids=`` is accepted in place of ``idx`` (Hugging Face batches); other keyword arguments
        (``attention_mask``, ``labels``, ...) are ignored: the model is causal and unpadded.
        """
        idx = input_ids if idx is None else idx
        if idx is None:
            raise TypeError("GPT.forward needs token ids: pass idx (or input_ids=)")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ConfigError(
                f"sequence length {T} exceeds GPTConfig.block_size={self.config.block_size}; "
                "use shorter sequences or a larger block_size"
            )
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab_size)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T) and return (B, T + max_new_tokens).

        The context is cropped to the last ``block_size`` tokens. ``temperature=0`` picks the argmax;
        ``top_k`` keeps only the k most likely tokens before sampling.
        """
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size :])[:, -1, :]  # (B, vocab_size)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


@register_model("tinygpt", GPTConfig)
def build_tinygpt(config: GPTConfig) -> GPT:
    """Build a :class:`GPT` from its config."""
    return GPT(config)
