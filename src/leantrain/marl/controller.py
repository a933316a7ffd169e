"""The multi-agent controller: one shared agent network run for every agent, and action selection.

Agent inputs at slot t: the agent's observation, its previous action one-hot (zeros at t = 0; ``last_action=False``
leaves it out) and its one-hot id (PyMARL's ``obs_last_action`` and ``obs_agent_id``). The agent network is picked
by name from :data:`~leantrain.marl.networks.AGENTS` (``marl.agent``, default the GRU ``rnn``); ``shared=False``
gives every agent its own copy (:class:`~leantrain.marl.networks.PerAgent`). Acting steps one slot for every
environment at once (:meth:`MultiAgentController.step`); training unrolls whole episodes in one call
(:meth:`MultiAgentController.unroll`: every slot's inputs are known from the batch). Action selection (a runner's
``select_actions``) is epsilon-greedy over the available actions (exploration picks uniformly among them), or for
policy-gradient learners, whose controller outputs logits, a draw from the softmax over the available actions
(:func:`sample_policy`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from leantrain.marl.env import EnvInfo
from leantrain.marl.networks import AGENTS, PerAgent

NEG = -1e9  # the Q of an unavailable action when taking maxima


class EpsilonSchedule:
    """Linear decay from ``start`` to ``finish`` over ``anneal_steps`` environment steps, then constant."""

    def __init__(self, start: float = 1.0, finish: float = 0.05, anneal_steps: int = 50_000):
        self.start, self.finish, self.anneal = start, finish, max(anneal_steps, 1)

    def __call__(self, t_env: int) -> float:
        frac = min(t_env / self.anneal, 1.0)
        return self.start + frac * (self.finish - self.start)


class MultiAgentController(nn.Module):
    def __init__(self, info: EnvInfo, hidden: int = 64, agent: str = "rnn", last_action: bool = True,
                 shared: bool = True):  # fmt: skip
        super().__init__()
        self.info, self.agent_name, self.last_action, self.shared = info, agent, last_action, shared
        build = AGENTS.pick(agent)
        input_dim = info.obs_dim + info.n_actions * last_action + info.n_agents
        if shared:
            self.agent = build(input_dim, info.n_actions, hidden)
        else:
            self.agent = PerAgent([build(input_dim, info.n_actions, hidden) for _ in range(info.n_agents)])
        self.register_buffer("ids", torch.eye(info.n_agents))

    def like(self) -> MultiAgentController:
        """A fresh controller of the same shape and agent network (S2Q's sub-values)."""
        return MultiAgentController(self.info, self.agent.hidden, self.agent_name, self.last_action, self.shared)

    def inputs(self, obs: torch.Tensor, last_actions: torch.Tensor | None) -> torch.Tensor:
        """obs (B, N, obs_dim), last_actions (B, N) or None -> (B·N, input_dim)."""
        b, n, _ = obs.shape
        parts = [obs]
        if self.last_action:
            last = torch.zeros(b, n, self.info.n_actions)
            if last_actions is not None:
                last = nn.functional.one_hot(last_actions, self.info.n_actions).float()
            parts.append(last)
        return torch.cat([*parts, self.ids.expand(b, n, n)], dim=-1).reshape(b * n, -1)

    def init_hidden(self, batch: int) -> torch.Tensor:
        return self.agent.init_hidden(batch * self.info.n_agents)

    def step(self, obs: torch.Tensor, last_actions: torch.Tensor | None, h: torch.Tensor):
        """One slot for B environments: (q (B, N, A), h')."""
        q, h = self.agent(self.inputs(obs, last_actions), h)
        return q.view(obs.shape[0], self.info.n_agents, -1), h

    def unroll(self, obs: torch.Tensor, actions: torch.Tensor, hidden: bool = False):
        """Q of every slot of a batch: obs (B, T+1, N, obs_dim), actions (B, T, N) -> (B, T+1, N, A).

        With ``hidden=True`` also the agents' hidden states after each slot, (B, T+1, N, hidden). The same values
        as calling :meth:`step` slot by slot (tested), computed as one sequence per agent."""
        b, slots, n, _ = obs.shape
        parts = [obs]
        if self.last_action:
            last = torch.zeros(b, slots, n, self.info.n_actions)
            last[:, 1:] = nn.functional.one_hot(actions[:, : slots - 1], self.info.n_actions).float()
            parts.append(last)
        x = torch.cat([*parts, self.ids.expand(b, slots, n, n)], dim=-1)  # (B, T+1, N, D)
        q, h = self.agent.unroll(x.transpose(1, 2).reshape(b * n, slots, -1))  # (B·N, T+1, ·)
        qs = q.view(b, n, slots, -1).transpose(1, 2)
        return (qs, h.view(b, n, slots, -1).transpose(1, 2)) if hidden else qs


def greedy(q: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """Per-agent argmax over available actions: q, avail (..., A) -> (...)."""
    return q.masked_fill(~avail.bool(), NEG).argmax(-1)


def epsilon_greedy(q: torch.Tensor, avail: torch.Tensor, epsilon: float, rng: np.random.Generator,
                   generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """q, avail (B, N, A) -> actions (B, N): greedy, or with probability epsilon uniform over available actions.

    ``rng`` draws who explores; ``generator`` (a runner keeps one for its lifetime) draws the random actions;
    without one, a generator is seeded from ``rng`` for this call."""
    actions = greedy(q, avail)
    if epsilon <= 0:
        return actions
    explore = torch.as_tensor(rng.random(actions.shape) < epsilon)
    if explore.any():
        weights = avail.float().view(-1, avail.shape[-1])
        if generator is None:
            generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        random = torch.multinomial(weights, 1, generator=generator).view(actions.shape)
        actions = torch.where(explore, random, actions)
    return actions


def masked_log_softmax(logits: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the softmax over the available actions: logits, avail (..., A) -> (..., A).

    An unavailable action's logit is NEG before the softmax, so its probability is exactly 0 in float32."""
    return torch.log_softmax(logits.masked_fill(~avail.bool(), NEG), dim=-1)


def sample_policy(logits: torch.Tensor, avail: torch.Tensor, epsilon: float, rng: np.random.Generator,
                  generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """logits, avail (B, N, A) -> actions (B, N) drawn from each agent's softmax over its available actions.

    The action selection of policy-gradient learners (MAPPO): sampling is their exploration, so ``epsilon`` is
    ignored; ``generator`` draws the actions (seeded from ``rng`` when none is given)."""
    if generator is None:
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    probs = masked_log_softmax(logits, avail).exp()
    return torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])
