"""Agent and mixing networks of value decomposition: the shared GRU agent, VDN and QMIX.

- :class:`RNNAgent` (PyMARL's ``rnn`` agent): input → 64 ReLU → GRUCell(64) → Q per action; one network shared by
  all agents, whose inputs carry the agent's one-hot id and its previous action. Acting steps one slot at a time
  (:meth:`RNNAgent.forward`); training unrolls a whole sequence in one fused GRU call (:meth:`RNNAgent.unroll`,
  the same weights and the same outputs as stepping the cell, about 1.4x faster forward + backward).
- Agent networks are registered by name in :data:`AGENTS` (``marl.agent``): a method that needs its own agent
  network (FoX's formation head) registers a builder ``(input_dim, n_actions, hidden) -> module`` with
  ``init_hidden(rows)``, ``forward(inputs, h) -> (q, h')`` and ``unroll(inputs (M, T, D)) -> (q, hidden)``.
- :class:`PerAgent`: one agent network per agent (no parameter sharing) behind the same interface (MAPPO's
  separated policies, ``shared=False`` of the controller).
- :class:`VDNMixer`: Q_tot = Σ_i Q_i (Sunehag et al. 2018).
- :class:`QMixer` (Rashid et al. 2018): Q_tot = w2ᵀ elu(W1ᵀ q + b1) + b2 with W1, w2 ≥ 0 from hypernetworks of the
  state (absolute values), so ∂Q_tot/∂Q_i ≥ 0: the argmax of each Q_i is the argmax of Q_tot. Two-layer
  hypernetworks (embed 64) and mixing embed 32, the PyMARL defaults; b2 comes from a two-layer state network.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from leantrain.registry import Registry


class RNNAgent(nn.Module):
    def __init__(self, input_dim: int, n_actions: int, hidden: int = 64):
        super().__init__()
        self.hidden = hidden
        self.fc1 = nn.Linear(input_dim, hidden)
        self.rnn = nn.GRUCell(hidden, hidden)
        self.fc2 = nn.Linear(hidden, n_actions)

    def init_hidden(self, batch: int) -> torch.Tensor:
        return self.fc1.weight.new_zeros(batch, self.hidden)

    def forward(self, inputs: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (M, input_dim), h (M, hidden) -> (q (M, n_actions), h' (M, hidden))."""
        h = self.rnn(F.relu(self.fc1(inputs)), h)
        return self.fc2(h), h

    def unroll(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole sequence from a zero hidden state: inputs (M, T, input_dim) -> (q (M, T, A), hidden (M, T, H)).

        One fused GRU over the sequence with the cell's own weights (``torch.gru``, what ``nn.GRU`` calls): the
        same numbers as stepping :meth:`forward` T times, without T separate cell calls in the backward graph."""
        x = F.relu(self.fc1(inputs))
        cell = self.rnn
        h0 = x.new_zeros(1, x.shape[0], self.hidden)
        weights = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
        hidden = torch.gru(x, h0, weights, True, 1, 0.0, self.training, False, True)[0]
        return self.fc2(hidden), hidden


class PerAgent(nn.Module):
    """N agent networks, one per agent, behind one agent network's interface.

    The controller lays its rows out as (batch, agent) flattened with the agent last, so row r belongs to agent
    r % N; each network sees only its agent's rows."""

    def __init__(self, agents: list[nn.Module]):
        super().__init__()
        self.agents = nn.ModuleList(agents)
        self.hidden = agents[0].hidden

    def init_hidden(self, rows: int) -> torch.Tensor:
        return self.agents[0].init_hidden(rows)

    def forward(self, inputs: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B·N, D), h (B·N, H) -> (q (B·N, A), h' (B·N, H))."""
        n = len(self.agents)
        x, h = inputs.view(-1, n, inputs.shape[-1]), h.view(-1, n, h.shape[-1])  # (B, N, ·)
        outs = [agent(x[:, i], h[:, i]) for i, agent in enumerate(self.agents)]
        return tuple(torch.stack(parts, 1).flatten(0, 1) for parts in zip(*outs, strict=True))

    def unroll(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B·N, T, D) -> (q (B·N, T, A), hidden (B·N, T, H))."""
        n = len(self.agents)
        x = inputs.view(-1, n, *inputs.shape[1:])  # (B, N, T, D)
        outs = [agent.unroll(x[:, i]) for i, agent in enumerate(self.agents)]
        return tuple(torch.stack(parts, 1).flatten(0, 1) for parts in zip(*outs, strict=True))


AgentBuilder = Callable[[int, int, int], nn.Module]  # (input_dim, n_actions, hidden) -> agent network
AGENTS: Registry[AgentBuilder] = Registry("MARL agent network")
register_agent = AGENTS.register
register_agent("rnn")(RNNAgent)


class VDNMixer(nn.Module):
    def forward(self, agent_qs: torch.Tensor, states: torch.Tensor | None = None) -> torch.Tensor:
        """agent_qs (B, T, N) -> Q_tot (B, T)."""
        return agent_qs.sum(-1)


class QMixer(nn.Module):
    def __init__(self, n_agents: int, state_dim: int, embed: int = 32, hypernet_embed: int = 64):
        super().__init__()
        self.n_agents, self.embed = n_agents, embed
        self.hyper_w1 = nn.Sequential(nn.Linear(state_dim, hypernet_embed), nn.ReLU(),
                                      nn.Linear(hypernet_embed, embed * n_agents))  # fmt: skip
        self.hyper_w2 = nn.Sequential(
            nn.Linear(state_dim, hypernet_embed), nn.ReLU(), nn.Linear(hypernet_embed, embed)
        )
        self.hyper_b1 = nn.Linear(state_dim, embed)
        self.v = nn.Sequential(nn.Linear(state_dim, embed), nn.ReLU(), nn.Linear(embed, 1))

    def forward(self, agent_qs: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """agent_qs (B, T, N), states (B, T, state_dim) -> Q_tot (B, T)."""
        b, t, n = agent_qs.shape
        s = states.reshape(b * t, -1)
        q = agent_qs.reshape(b * t, 1, n)
        w1 = self.hyper_w1(s).abs().view(-1, n, self.embed)  # (BT, N, E)
        hidden = F.elu(torch.bmm(q, w1) + self.hyper_b1(s).view(-1, 1, self.embed))  # (BT, 1, E)
        w2 = self.hyper_w2(s).abs().view(-1, self.embed, 1)  # (BT, E, 1)
        y = torch.bmm(hidden, w2) + self.v(s).view(-1, 1, 1)  # (BT, 1, 1)
        return y.view(b, t)


MixerBuilder = Callable[[int, int], nn.Module]  # (n_agents, state_dim) -> mixer
MIXERS: Registry[MixerBuilder] = Registry("mixer")
MIXERS.register("vdn")(lambda n_agents, state_dim: VDNMixer())
MIXERS.register("qmix")(QMixer)


def make_mixer(name: str, n_agents: int, state_dim: int) -> nn.Module:
    return MIXERS.pick(name)(n_agents, state_dim)
