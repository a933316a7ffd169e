"""Value targets: n-step-free one-step targets and TD(λ) returns over padded episode batches.

TD(λ) (as pymarl2's ``build_td_lambda_targets``, written out): with target values Q_{t+1} of the next slot,

    G_t = r_t + γ (1 − d_t) [(1 − λ) Q_{t+1} + λ G_{t+1}],

computed backwards from the last slot, where the bootstrap is Q_T unless the episode terminated. Padding steps
(``filled`` = 0) carry nothing forward once the episode has terminated; time-limit truncation (not terminated)
bootstraps from the last slot. λ = 0 gives the one-step target r_t + γ (1 − d_t) Q_{t+1}.

GAE(λ) (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
arXiv 1506.02438), the advantages of policy-gradient learners (MAPPO), on the same layout:

    δ_t = r_t + γ (1 − d_t) V_{t+1} − V_t,    A_t = δ_t + γ λ (1 − d_t) A_{t+1},

with A = 0 past an episode's last real step: a truncated episode's last step bootstraps from V of its last
observation (slot T), a terminated one's from nothing.
"""

from __future__ import annotations

import torch


def td_lambda_targets(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    filled: torch.Tensor,
    target_q: torch.Tensor,
    gamma: float,
    lam: float,
) -> torch.Tensor:
    """rewards, terminated, filled (B, T); target_q (B, T+1) -> G (B, T)."""
    b, t = rewards.shape
    ended = terminated.sum(1).clamp(max=1)  # (B,) 1 if the episode terminated
    g = target_q[:, t] * (1 - ended)  # (B,) bootstrap after the last slot
    out = torch.zeros_like(rewards)
    for i in range(t - 1, -1, -1):
        step = rewards[:, i] + gamma * (1 - terminated[:, i]) * ((1 - lam) * target_q[:, i + 1] + lam * g)
        # past the end of an episode, the padded slots carry G forward untouched (and are masked in the loss)
        g = torch.where(filled[:, i] > 0, step, g)
        out[:, i] = g
    return out


def gae_advantages(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    filled: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, terminated, filled (B, T); values (B, T+1) -> (advantages (B, T), returns A + V (B, T)).

    Padding steps (``filled`` = 0) get advantage 0 and pass 0 on to the step before them."""
    adv = torch.zeros_like(rewards)
    nxt = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
    for i in range(rewards.shape[1] - 1, -1, -1):
        alive = 1 - terminated[:, i]
        delta = rewards[:, i] + gamma * alive * values[:, i + 1] - values[:, i]
        nxt = filled[:, i] * (delta + gamma * lam * alive * nxt)
        adv[:, i] = nxt
    return adv, adv + values[:, :-1]
