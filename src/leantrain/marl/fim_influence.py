"""FIM's influence bonus: a forward model of the state, each agent's counterfactual influence on the focus
dimensions, eligibility traces and the synchronized-focus reward ("Center of Gravity-Guided Focusing Influence
Mechanism for Multi-Agent Reinforcement Learning", Park, Lee, Han, arXiv 2506.19417).

The paper's formulas are not public; everything here is an interpretation (listed in :mod:`leantrain.marl.fim`):

- :class:`ForwardModel` g(s_t, a_t) -> predicted s_{t+1} − s_t (an MLP on the state and the joint action one-hot,
  masked MSE over real steps).
- Influence of agent i on dimension d (:func:`counterfactual_influence`, EITI/EDTI-style, others' actions held):
  I^i_{t,d} = | g_d(s_t, a_t) − mean_{b ∈ avail^i_t} g_d(s_t, (b, a_t^{−i})) |.
- Eligibility trace (:func:`eligibility_traces`): e^i_{t,d} = λ_e e^i_{t−1,d} + I^i_{t,d}, zero before an
  episode's first step (every batch row is one episode from its start).
- Synchronized focus (:func:`synchronized_focus`): r_t = Σ_{d ∈ C} F(e^1_{t,d}, ..., e^N_{t,d}) with F the minimum
  over agents (default: a dimension pays only while every agent's trace on it is up), the mean or the geometric mean.
"""

from __future__ import annotations

import torch
from torch import nn

SYNCHRONY = ("min", "mean", "geometric")


class ForwardModel(nn.Module):
    """g(s, a) -> predicted change of the state: (..., S), (..., N, A) one-hot -> (..., S)."""

    def __init__(self, state_dim: int, n_agents: int, n_actions: int, hidden: int = 128):
        super().__init__()
        self.n_actions = n_actions
        self.net = nn.Sequential(nn.Linear(state_dim + n_agents * n_actions, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, state_dim))  # fmt: skip

    def forward(self, state: torch.Tensor, joint: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([state, joint.flatten(-2)], -1))

    def loss(self, states: torch.Tensor, actions: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """Masked MSE of the predicted change: states (B, T+1, S), actions (B, T, N), filled (B, T)."""
        joint = nn.functional.one_hot(actions, self.n_actions).float()  # (B, T, N, A)
        err = (self(states[:, :-1], joint) - (states[:, 1:] - states[:, :-1])).square().mean(-1)  # (B, T)
        return (err * filled).sum() / filled.sum().clamp_min(1)


@torch.no_grad()
def counterfactual_influence(model: ForwardModel, state: torch.Tensor, actions: torch.Tensor, avail: torch.Tensor,
                             dims: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """I^i_{t,d}: state (B, T, S) = s_t, actions (B, T, N), avail (B, T, N, A), dims (C,) -> (B, T, N, C)."""
    b, t, n = actions.shape
    a = avail.shape[-1]
    joint = nn.functional.one_hot(actions, a).float()  # (B, T, N, A)
    actual = model(state, joint)[..., dims]  # (B, T, C)
    states = state.unsqueeze(2).expand(b, t, a, state.shape[-1])  # (B, T, A, S)
    eye = torch.eye(a)
    out = []
    for i in range(n):
        alternatives = joint.unsqueeze(2).repeat(1, 1, a, 1, 1)  # (B, T, A, N, A): row k has agent i play k
        alternatives[:, :, :, i] = eye
        pred = model(states, alternatives)[..., dims]  # (B, T, A, C)
        w = avail[:, :, i].float()  # (B, T, A)
        baseline = (pred * w[..., None]).sum(2) / w.sum(2).clamp_min(1)[..., None]  # (B, T, C)
        out.append((actual - baseline).abs())
    return torch.stack(out, 2)


def eligibility_traces(influence: torch.Tensor, filled: torch.Tensor, decay: float) -> torch.Tensor:
    """e_t = decay · e_{t−1} + I_t from e_{−1} = 0 along each episode (padding adds nothing):
    influence (B, T, ...), filled (B, T) -> (B, T, ...)."""
    mask = filled.reshape(*filled.shape, *([1] * (influence.dim() - 2)))
    trace = torch.zeros_like(influence[:, 0])
    out = []
    for t in range(influence.shape[1]):
        trace = decay * trace + influence[:, t] * mask[:, t]
        out.append(trace)
    return torch.stack(out, 1)


def synchronized_focus(traces: torch.Tensor, how: str = "min") -> torch.Tensor:
    """Σ_d F over agents of the traces: (B, T, N, C) -> (B, T)."""
    if how == "min":
        per_dim = traces.min(2).values
    elif how == "mean":
        per_dim = traces.mean(2)
    elif how == "geometric":
        per_dim = traces.clamp_min(1e-12).log().mean(2).exp()
    else:
        raise ValueError(f"synchrony {how!r} must be one of {SYNCHRONY}")
    return per_dim.sum(-1)


class RunningScale:
    """Running standard deviation (exponential moving averages of the mean and the mean square, ``decay``) of the
    raw bonus over real steps: the bonus is divided by it, so beta sets the bonus's scale."""

    def __init__(self, decay: float = 0.99):
        self.decay, self.mean, self.square, self.updates = decay, 0.0, 0.0, 0

    def update(self, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        mean, square = float(values.mean()), float(values.square().mean())
        keep = self.decay if self.updates else 0.0
        self.mean, self.square = keep * self.mean + (1 - keep) * mean, keep * self.square + (1 - keep) * square
        self.updates += 1

    @property
    def std(self) -> float:
        return max(self.square - self.mean**2, 0.0) ** 0.5

    def state(self) -> dict:
        return {"mean": self.mean, "square": self.square, "updates": self.updates}

    def load_state(self, state: dict) -> None:
        self.mean, self.square, self.updates = state["mean"], state["square"], state["updates"]
