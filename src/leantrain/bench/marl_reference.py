"""Reference loops the MARL throughput benchmark measures our runner and learner against (not library code).

- :func:`pymarl_style_episode`: PyMARL's ``EpisodeRunner`` pattern, written out on our network and environment
  adapter: one environment; at every step the episode batch is written field by field at slot t, the agent
  inputs are rebuilt from the batch (observation, previous action one-hot, agent id: ``BasicMAC._build_inputs``),
  one agent forward, and PyMARL's ``EpsilonGreedyActionSelector`` (mask unavailable actions with -inf, draw
  ``torch.rand`` per agent and a ``Categorical`` over the available actions).
- :func:`step_by_step_unroll`: the training unroll as PyMARL's learners compute it, one agent-cell call per slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Categorical

from leantrain.marl.controller import MultiAgentController
from leantrain.marl.env import MultiAgentEnv


@torch.no_grad()
def pymarl_style_episode(env: MultiAgentEnv, mac: MultiAgentController, epsilon: float, seed: int) -> int:
    """One episode collected the PyMARL way; returns its number of steps."""
    info = env.info
    n, a, limit = info.n_agents, info.n_actions, info.episode_limit
    batch = {
        "obs": torch.zeros(1, limit + 1, n, info.obs_dim),
        "state": torch.zeros(1, limit + 1, info.state_dim),
        "avail_actions": torch.zeros(1, limit + 1, n, a, dtype=torch.long),
        "actions": torch.zeros(1, limit + 1, n, 1, dtype=torch.long),
        "actions_onehot": torch.zeros(1, limit + 1, n, a),
        "reward": torch.zeros(1, limit + 1, 1),
        "terminated": torch.zeros(1, limit + 1, 1, dtype=torch.uint8),
    }
    o = env.reset(seed=seed)
    h = mac.agent.init_hidden(n)
    t = 0
    while True:
        batch["obs"][:, t] = torch.tensor(o.obs)
        batch["state"][:, t] = torch.tensor(o.state)
        batch["avail_actions"][:, t] = torch.tensor(o.avail, dtype=torch.long)
        last = torch.zeros(1, n, a) if t == 0 else batch["actions_onehot"][:, t - 1]
        inputs = torch.cat([batch["obs"][:, t], last, torch.eye(n).unsqueeze(0)], dim=-1).reshape(n, -1)
        q, h = mac.agent(inputs, h)
        avail = batch["avail_actions"][0, t]
        masked = q.clone()
        masked[avail == 0] = -float("inf")
        pick_random = (torch.rand_like(q[:, 0]) < epsilon).long()
        random_actions = Categorical(avail.float()).sample().long()
        picked = pick_random * random_actions + (1 - pick_random) * masked.max(dim=1)[1]
        step = env.step(picked.numpy())
        batch["actions"][:, t] = picked.view(n, 1)
        batch["actions_onehot"][:, t] = F.one_hot(picked, a).float()
        batch["reward"][:, t] = step.reward
        batch["terminated"][:, t] = int(step.terminated)
        o = step.observation
        t += 1
        if step.terminated or step.truncated or t >= limit:
            break
    batch["obs"][:, t] = torch.tensor(o.obs)
    batch["state"][:, t] = torch.tensor(o.state)
    batch["avail_actions"][:, t] = torch.tensor(o.avail, dtype=torch.long)
    return t


def step_by_step_unroll(mac: MultiAgentController, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Q of every slot, one cell call per slot: obs (B, T+1, N, O), actions (B, T, N) -> (B, T+1, N, A)."""
    b, slots = obs.shape[:2]
    h, out = mac.init_hidden(b), []
    for t in range(slots):
        q, h = mac.step(obs[:, t], actions[:, t - 1] if t else None, h)
        out.append(q)
    return torch.stack(out, 1)
