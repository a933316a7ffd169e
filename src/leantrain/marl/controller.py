"""The multi-agent controller: one shared agent network run for every agent, and action selection.

Agent inputs at slot t: the agent's observation, its previous action one-hot (zeros at t = 0) and its one-hot id
(PyMARL's ``obs_last_action`` and ``obs_agent_id``). Action selection is epsilon-greedy over the available
actions; exploration picks uniformly among available actions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from leantrain.marl.env import EnvInfo
from leantrain.marl.networks import RNNAgent

NEG = -1e9  # the Q of an unavailable action when taking maxima


class EpsilonSchedule:
    """Linear decay from ``start`` to ``finish`` over ``anneal_steps`` environment steps, then constant."""

    def __init__(self, start: float = 1.0, finish: float = 0.05, anneal_steps: int = 50_000):
        self.start, self.finish, self.anneal = start, finish, max(anneal_steps, 1)

    def __call__(self, t_env: int) -> float:
        frac = min(t_env / self.anneal, 1.0)
        return self.start + frac * (self.finish - self.start)


class MultiAgentController(nn.Module):
    def __init__(self, info: EnvInfo, hidden: int = 64):
        super().__init__()
        self.info = info
        self.agent = RNNAgent(info.obs_dim + info.n_actions + info.n_agents, info.n_actions, hidden)
        self.register_buffer("ids", torch.eye(info.n_agents))

    def inputs(self, obs: torch.Tensor, last_actions: torch.Tensor | None) -> torch.Tensor:
        """obs (B, N, obs_dim), last_actions (B, N) or None -> (B·N, input_dim)."""
        b, n, _ = obs.shape
        last = torch.zeros(b, n, self.info.n_actions)
        if last_actions is not None:
            last = nn.functional.one_hot(last_actions, self.info.n_actions).float()
        return torch.cat([obs, last, self.ids.expand(b, n, n)], dim=-1).reshape(b * n, -1)

    def init_hidden(self, batch: int) -> torch.Tensor:
        return self.agent.init_hidden(batch * self.info.n_agents)

    def step(self, obs: torch.Tensor, last_actions: torch.Tensor | None, h: torch.Tensor):
        """One slot for B environments: (q (B, N, A), h')."""
        q, h = self.agent(self.inputs(obs, last_actions), h)
        return q.view(obs.shape[0], self.info.n_agents, -1), h

    def unroll(self, obs: torch.Tensor, actions: torch.Tensor, hidden: bool = False):
        """Q of every slot of a batch: obs (B, T+1, N, obs_dim), actions (B, T, N) -> (B, T+1, N, A).

        With ``hidden=True`` also the agents' hidden states after each slot, (B, T+1, N, hidden).
        """
        b, slots = obs.shape[:2]
        h = self.init_hidden(b)
        out, states = [], []
        for t in range(slots):
            q, h = self.step(obs[:, t], actions[:, t - 1] if t else None, h)
            out.append(q)
            states.append(h.view(b, self.info.n_agents, -1))
        qs = torch.stack(out, dim=1)
        return (qs, torch.stack(states, dim=1)) if hidden else qs


def greedy(q: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """Per-agent argmax over available actions: q, avail (..., A) -> (...)."""
    return q.masked_fill(~avail.bool(), NEG).argmax(-1)


def epsilon_greedy(q: torch.Tensor, avail: torch.Tensor, epsilon: float, rng: np.random.Generator) -> torch.Tensor:
    """q, avail (B, N, A) -> actions (B, N): greedy, or with probability epsilon uniform over available actions."""
    actions = greedy(q, avail)
    explore = torch.as_tensor(rng.random(actions.shape) < epsilon)
    if explore.any():
        weights = avail.float().view(-1, avail.shape[-1])
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        random = torch.multinomial(weights, 1, generator=generator).view(actions.shape)
        actions = torch.where(explore, random, actions)
    return actions
