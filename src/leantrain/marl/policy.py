"""MAPPO's centralised critic: V(s) of the global state, and the running normalisation of its targets.

Yu et al. 2022, "The Surprising Effectiveness of PPO in Cooperative Multi-Agent Games" (arXiv 2103.01955). The
decentralised policies are the core's :class:`~leantrain.marl.controller.MultiAgentController` whose agent network
outputs logits (GRU by default, shared or per agent); this module holds what only an actor-critic needs.

- :class:`StateValue`: LayerNorm on the state (the official ``use_feature_normalization``), two ReLU layers of
  ``hidden`` units, one output. A feed-forward critic on the environment's global state (the official MPE critic
  is recurrent on the concatenated observations; ``get_state`` of MPE here is that concatenation, so a
  feed-forward V(s) loses nothing there).
- :class:`ValueNorm`: the paper's value normalisation (its suggestion 1): a debiased running mean and variance of
  the value targets with decay ``beta`` = 0.99999; the critic learns normalised targets and GAE reads
  denormalised values. Its statistics are buffers, so they are saved and restored with the critic.
"""

from __future__ import annotations

import torch
from torch import nn


class ValueNorm(nn.Module):
    def __init__(self, beta: float = 0.99999, epsilon: float = 1e-5, min_var: float = 1e-2):
        super().__init__()
        self.beta, self.epsilon, self.min_var = beta, epsilon, min_var
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean_sq", torch.zeros((), dtype=torch.float64))
        self.register_buffer("debias", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, targets: torch.Tensor) -> None:
        """Fold in a batch of targets (any shape, real entries only)."""
        x = targets.double()
        self.mean.mul_(self.beta).add_(x.mean() * (1 - self.beta))
        self.mean_sq.mul_(self.beta).add_((x**2).mean() * (1 - self.beta))
        self.debias.mul_(self.beta).add_(1 - self.beta)

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the targets seen so far, debiased; std >= sqrt(min_var)."""
        d = self.debias.clamp(min=self.epsilon)
        mean, mean_sq = self.mean / d, self.mean_sq / d
        return mean.float(), (mean_sq - mean**2).clamp(min=self.min_var).sqrt().float()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats()
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats()
        return x * std + mean


class StateValue(nn.Module):
    """V(s): state (..., state_dim) -> value (...), in normalised units when ``norm`` is set."""

    def __init__(self, state_dim: int, hidden: int = 64, value_norm: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(state_dim), nn.Linear(state_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))  # fmt: skip
        self.norm = ValueNorm() if value_norm else None

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state).squeeze(-1)

    def normalize(self, returns: torch.Tensor) -> torch.Tensor:
        """Value targets in the critic's units."""
        return returns if self.norm is None else self.norm.normalize(returns)

    def denormalize(self, values: torch.Tensor) -> torch.Tensor:
        """The critic's outputs in return units."""
        return values if self.norm is None else self.norm.denormalize(values)
