"""The Wolfpack adversarial attack (WALL, Lee et al., ICML 2025, arXiv 2502.02844) as a runner hook.

An attacked agent executes its worst action, argmin over available actions of its own Q^i. A Wolfpack cycle hits
one *initial* agent at a *critical* step, then for the next ``duration`` (L = 3) steps the ``followups``
(m = 2) agents that would move to help it. Every attacked step counts against a per-episode ``budget`` (12 in
training, 8 at test): one cycle costs 1 + L steps.

- Follow-up agents (``followup="kl"``, the paper): copy the agent network, take one Adam step (lr = the
  learner's) that pulls Q_tot with the initial agent's worst action towards Q_tot with the intended actions
  ("how the team would compensate"), and pick the m other agents whose standardized-Q softmax moved most (KL).
  ``"l2"``: the m agents whose observations are closest to the initial agent's (the official option);
  ``"random"``: m random other agents.
- Critical step (``step_method="planner"``, the paper): a damage predictor (the paper's Q-difference
  transformer) reads the last ``window`` states and predicts, for every agent, the summed Q_tot drop of a cycle
  started at each of the next ``period`` steps; the maximum over agents per offset goes through
  softmax(·/T, T = 0.5), an offset is sampled and the attack starts now if it is 0. Offsets further than
  ``period`` steps from the previous initial attack are cut, so one comes at least every ``period`` steps.
  T = 0.5 suits SMAC's Q scale (rewards up to 20 per episode); on tasks whose return is at most 1 the predicted
  damages differ by hundredths and the softmax is nearly uniform, i.e. random timing. ``damage_scale="std"``
  (ours) divides the predicted damages by their standard deviation over the candidate offsets first, so T acts
  on a scale-free spread; ``"raw"`` (default) is the paper's rule.
  ``"random"``: start a cycle with probability 0.1 per step (the official random baseline).
- Initial agent: the predictor's arg-max agent (``initial_agent="planner"``, the paper) or a uniformly random
  agent (``"random"``, the official code's default ``init_agent_random=True``).

The damage predictor learns from imagined attacks: a planning transformer (a world model over windows of
state, agents' hidden states and joint action) rolls the agents forward L steps from each replayed step with
the initial agent's worst action, then the follow-ups' worst actions, and the target is
Σ_{l=0..L} Q_tot(normal) − Q_tot(attacked). Both transformers are trained with Adam on replay batches
(:meth:`WolfpackPlanner.fit`): by WALL's learner during training, or by :func:`fit_planner` against a fixed
policy.

Departures, all documented choices: hidden states are recomputed with the current agent network instead of the
stale ones stored at collection; the imagined follow-ups use the L2 rule (the official code reuses the KL
follow-ups recorded at every collection step, an extra optimizer step per environment step); targets are
imagined for every agent, not only the recorded initial agent; execution uses the same time-step window as
training (the official code shifts it by W − 1 at t ≥ W).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leantrain.errors import ConfigError
from leantrain.marl.controller import NEG, MultiAgentController, greedy
from leantrain.marl.episodes import EpisodeBatch


@dataclass
class WolfpackConfig:
    budget: int = 12  # attacked steps per training episode (num_attack_train)
    test_budget: int = 8  # per test episode (num_attack_test)
    duration: int = 3  # L: follow-up steps after the initial attack
    followups: int = 2  # m
    period: int = 20  # offsets the damage predictor covers; the longest gap between initial attacks
    window: int = 20  # states the transformers read
    temperature: float = 0.5
    embed: int = 64
    max_steps: int = 300  # time-step embedding size
    step_method: str = "planner"  # "planner" | "random"
    initial_agent: str = "planner"  # "planner" | "random"
    followup: str = "kl"  # "kl" | "l2" | "random"
    random_step_prob: float = 0.1
    damage_scale: str = "raw"  # "raw": softmax(damage / T) (paper); "std": damage / its std over offsets first
    imagine_episodes: int = 8  # episodes of each replay batch whose attacks are imagined (CPU budget)

    def __post_init__(self):
        choices = {"step_method": ("planner", "random"), "initial_agent": ("planner", "random"),
                   "followup": ("kl", "l2", "random"), "damage_scale": ("raw", "std")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"wolfpack {name}={getattr(self, name)!r}; choose from {list(allowed)}")
        if min(self.budget, self.test_budget, self.duration, self.followups) < 0 or self.period < 1:
            raise ConfigError("wolfpack budget, test_budget, duration, followups must be >= 0 and period >= 1")
        if self.window < 1 or self.temperature <= 0:
            raise ConfigError("wolfpack window must be >= 1 and temperature > 0")


def worst_actions(q: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """Per-agent argmin of Q over available actions: (..., A) -> (...)."""
    return q.masked_fill(~avail.bool(), -NEG).argmin(-1)


def windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` slots ending at every slot, zero-padded on the left: (B, T, *F) -> (B, T, size, *F)."""
    pad = torch.zeros(x.shape[0], size - 1, *x.shape[2:], dtype=x.dtype)
    full = torch.cat([pad, x], 1)
    idx = torch.arange(x.shape[1])[:, None] + torch.arange(size)[None, :]  # (T, size)
    return full[:, idx]


def _causal(n: int) -> torch.Tensor:
    return torch.triu(torch.full((n, n), float("-inf")), 1)


class PlanningTransformer(nn.Module):
    """World model: (state, agents' hidden states, joint action) per slot -> next state and next observations."""

    def __init__(self, n_agents: int, n_actions: int, obs_dim: int, state_dim: int, hidden: int, embed: int = 64):
        super().__init__()
        self.n_agents, self.n_actions = n_agents, n_actions
        self.state_in = nn.Linear(state_dim, embed)
        self.hidden_in = nn.Linear(n_agents * hidden, embed)
        self.action_in = nn.Linear(n_agents * n_actions, embed)
        d = 3 * embed
        self.block = nn.TransformerDecoderLayer(d, 1, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.next_state = nn.Linear(d, state_dim)
        self.obs_embed = nn.Linear(d, embed)
        self.obs_out = nn.Sequential(nn.Linear(embed + n_agents, embed), nn.ReLU(), nn.Linear(embed, obs_dim))

    def _tokens(self, states, hidden, actions, valid):
        onehot = F.one_hot(actions, self.n_actions).float() * valid[..., None, None]
        return torch.cat([F.relu(self.state_in(states)), F.relu(self.hidden_in(hidden.flatten(-2))),
                          F.relu(self.action_in(onehot.flatten(-2)))], -1)  # fmt: skip

    def _heads(self, y):
        e = self.obs_embed(y)  # (M, W, E)
        ids = torch.eye(self.n_agents).expand(*e.shape[:2], -1, -1)
        obs = self.obs_out(torch.cat([e.unsqueeze(-2).expand(-1, -1, self.n_agents, -1), ids], -1))
        return self.next_state(y), obs

    def forward(self, states, hidden, actions, valid):
        """states (M, W, S), hidden (M, W, N, H), actions (M, W, N) long, valid (M, W) -> s' (M, W, S),
        o' (M, W, N, O): the next state and observations predicted at every slot (causal)."""
        x = self._tokens(states, hidden, actions, valid)
        mask = _causal(x.shape[1])
        return self._heads(self.block(x, x, tgt_mask=mask, memory_mask=mask))

    def forward_last(self, states, hidden, actions, valid):
        """:meth:`forward` at the window's last slot only (what imagination needs; the other queries are skipped):
        -> (s' (M, S), o' (M, N, O))."""
        x = self._tokens(states, hidden, actions, valid)
        layer, y = self.block, x[:, -1:]
        # post-norm decoder layer; the last query sees every slot, so the causal masks drop out
        y = layer.norm1(y + layer.self_attn(y, x, x, need_weights=False)[0])
        y = layer.norm2(y + layer.multihead_attn(y, x, x, need_weights=False)[0])
        y = layer.norm3(y + layer.linear2(layer.activation(layer.linear1(y))))
        s_next, obs = self._heads(y)
        return s_next[:, 0], obs[:, 0]


class DamagePredictor(nn.Module):
    """The Q-difference transformer: a window of states (+ time steps) -> per agent, the damage of an attack
    cycle started at each of the next ``period`` steps."""

    def __init__(self, n_agents: int, state_dim: int, period: int, embed: int = 64, max_steps: int = 300):
        super().__init__()
        self.n_agents, self.max_steps = n_agents, max_steps
        self.state_in = nn.Linear(state_dim, embed)
        self.time = nn.Embedding(max_steps + 1, embed)
        self.block = nn.TransformerEncoderLayer(embed, 1, 4 * embed, dropout=0.1, activation="gelu", batch_first=True)
        self.head = nn.Linear(embed + n_agents, period)

    def forward(self, states: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """states (M, W, S), times (M, W) long -> (M, N, period) read at the window's last slot."""
        x = self.state_in(states) + self.time(times.clamp(0, self.max_steps))
        z = self.block(x, src_mask=_causal(x.shape[1]))[:, -1]  # (M, E)
        ids = torch.eye(self.n_agents).expand(z.shape[0], -1, -1)
        return self.head(torch.cat([z.unsqueeze(1).expand(-1, self.n_agents, -1), ids], -1))


def l2_followups(obs: torch.Tensor, initial: torch.Tensor, m: int) -> torch.Tensor:
    """The m agents (never the initial one) whose observations are closest to the initial agent's.

    obs (M, N, O), initial (M,) -> (M, m)."""
    dist = (obs - obs[torch.arange(obs.shape[0]), initial].unsqueeze(1)).pow(2).sum(-1)  # (M, N)
    dist = dist.scatter(1, initial[:, None], float("inf"))
    return dist.argsort(1)[:, :m]


class WolfpackPlanner(nn.Module):
    """The two transformers of the critical-step planner and their training on replay."""

    def __init__(self, mac: MultiAgentController, config: WolfpackConfig, lr: float = 5e-4, seed: int = 0):
        super().__init__()
        info = mac.info
        self.config = config
        self.world = PlanningTransformer(info.n_agents, info.n_actions, info.obs_dim, info.state_dim,
                                         mac.agent.hidden, config.embed)  # fmt: skip
        self.damage = DamagePredictor(info.n_agents, info.state_dim, config.period, config.embed, config.max_steps)
        self.world_opt = torch.optim.Adam(self.world.parameters(), lr=lr)
        self.damage_opt = torch.optim.Adam(self.damage.parameters(), lr=lr)
        self.rng = np.random.default_rng(seed)  # the windows sampled for training

    # ------------------------------------------------------------ training

    def fit(self, batch: EpisodeBatch, mac: MultiAgentController, mixer: nn.Module) -> dict[str, float]:
        """One Adam step of each transformer on a replay batch (the agent network and mixer stay fixed)."""
        c = self.config
        batch = batch.trimmed()
        obs, states, filled = batch["obs"], batch["state"], batch["filled"]
        intended = batch["actions"]
        executed = batch["step_executed"].long() if "step_executed" in batch.data else intended
        b, t = intended.shape[:2]
        with torch.no_grad():
            q, hidden = mac.unroll(obs, intended, hidden=True)  # (B, T+1, N, A), (B, T+1, N, H)
        w = min(c.window, t)
        starts = torch.as_tensor(self.rng.integers(0, t - w + 1, size=b))
        pos = starts[:, None] + torch.arange(w)[None]  # (B, w) the sampled window of every episode
        rows = torch.arange(b)[:, None]

        # world model: predict slot p+1 from the window's slots up to p (executed actions)
        valid = filled[rows, pos]
        s_hat, o_hat = self.world(states[rows, pos], hidden[rows, pos], executed[rows, pos], valid)
        denom = valid.sum().clamp_min(1)
        world_loss = ((s_hat - states[rows, pos + 1]).pow(2).mean(-1) * valid).sum() / denom
        world_loss = world_loss + ((o_hat - obs[rows, pos + 1]).pow(2).mean((-1, -2)) * valid).sum() / denom
        self.world_opt.zero_grad(set_to_none=True)
        world_loss.backward()
        self.world_opt.step()

        # damage predictor: windows of states ending at every sampled slot -> damage of the next `period` starts
        target = self.imagined_damage(batch, q, hidden, executed, pos, mac, mixer)  # (B', w, N)
        b = target.shape[0]  # imagination runs on the first `imagine_episodes` episodes of the batch
        valid, pos, rows, states = valid[:b], pos[:b], rows[:b], states[:b]
        times = (pos[..., None] - c.window + 1 + torch.arange(c.window)).clamp_min(0)  # (B, w, W); padding: 0
        s_win = windows(states[:, :t], c.window)[rows, pos]  # (B, w, W, S)
        pred = self.damage(s_win.flatten(0, 1), times.flatten(0, 1)).view(b, w, -1, c.period)
        loss, count = 0.0, 0.0
        for j in range(w):
            k = min(w - j, c.period)
            m = valid[:, j : j + k]  # (B, k)
            err = (pred[:, j, :, :k] - target[:, j : j + k].transpose(1, 2)).pow(2) * m[:, None]
            loss = loss + err.sum() / k
            count = count + valid[:, j].sum()
        damage_loss = loss / count.clamp_min(1)
        self.damage_opt.zero_grad(set_to_none=True)
        damage_loss.backward()
        self.damage_opt.step()
        return {"loss_world": world_loss.item(), "loss_damage": damage_loss.item(),
                "damage_mean": float((target.mean(-1) * valid).sum() / valid.sum().clamp_min(1))}  # fmt: skip

    @torch.no_grad()
    def imagined_damage(self, batch, q, hidden, executed, pos, mac, mixer) -> torch.Tensor:
        """Σ_{l=0..L} Q_tot(normal) − Q_tot(attacked) of a cycle started at every sampled slot by every agent.

        Returns (B, w, N). Slot 0 uses the real agent Qs with the initial agent's worst action; the next L slots
        are imagined with the world model, follow-ups (L2 rule) taking their worst actions, the others greedy."""
        c = self.config
        b = min(c.imagine_episodes, pos.shape[0])
        obs, states, avail, filled = (batch[k][:b] for k in ("obs", "state", "avail", "filled"))
        intended, q, hidden, executed, pos = batch["actions"][:b], q[:b], hidden[:b], executed[:b], pos[:b]
        t, n = intended.shape[1:]
        w = pos.shape[1]
        rows = torch.arange(b)[:, None]
        chosen = q[:, :-1].gather(-1, intended.unsqueeze(-1)).squeeze(-1)  # (B, T, N)
        normal = mixer(chosen, states[:, :-1]) * filled  # (B, T)
        ahead = torch.stack([F.pad(normal, (0, c.duration))[:, i : i + t] for i in range(c.duration + 1)]).sum(0)
        normal_sum = ahead[rows, pos]  # (B, w)

        # one imagined rollout per (episode, slot, initial agent): M = B * w * N
        def per_agent(x):  # (B, w, ...) -> (B * w * N, ...)
            return x.unsqueeze(2).expand(b, w, n, *x.shape[2:]).reshape(b * w * n, *x.shape[2:])

        agent = torch.arange(n).repeat(b * w)  # the initial agent of each rollout
        m_rows = torch.arange(agent.shape[0])
        q0, a0, av0 = per_agent(q[rows, pos]), per_agent(intended[rows, pos]), per_agent(avail[rows, pos])
        joint = a0.clone()
        joint[m_rows, agent] = worst_actions(q0, av0)[m_rows, agent]
        s0 = per_agent(states[rows, pos])
        attacked = mixer(q0.gather(-1, joint.unsqueeze(-1)).squeeze(-1)[:, None], s0[:, None])[:, 0]  # (M,)
        follow = l2_followups(per_agent(obs[rows, pos]), agent, min(c.followups, n - 1))
        s_win = per_agent(windows(states[:, :t], c.window)[rows, pos])  # (M, W, S)
        h_win = per_agent(windows(hidden[:, :t], c.window)[rows, pos])  # (M, W, N, H)
        a_win = per_agent(windows(executed, c.window)[rows, pos])  # (M, W, N)
        v_win = per_agent(windows(filled, c.window)[rows, pos])  # (M, W)
        a_win[:, -1] = joint
        h = per_agent(hidden[rows, pos]).reshape(-1, hidden.shape[-1])  # (M·N, H)
        last = joint
        for step in range(1, c.duration + 1):
            s_next, o_next = self.world.forward_last(s_win, h_win, a_win, v_win)
            q_l, h = mac.step(o_next, last, h)
            slot = (pos + step).clamp(max=t)
            av = per_agent(avail[rows, slot])
            joint = greedy(q_l, av)
            joint.scatter_(1, follow, worst_actions(q_l, av).gather(1, follow))
            qtot = mixer(q_l.gather(-1, joint.unsqueeze(-1)).squeeze(-1)[:, None], s_next[:, None])[:, 0]
            alive = per_agent(F.pad(filled, (0, c.duration))[rows, pos + step])
            attacked = attacked + qtot * alive
            s_win = torch.cat([s_win[:, 1:], s_next[:, None]], 1)
            h_win = torch.cat([h_win[:, 1:], h.view(-1, 1, n, h.shape[-1])], 1)
            a_win = torch.cat([a_win[:, 1:], joint[:, None]], 1)
            v_win = torch.cat([v_win[:, 1:], alive[:, None]], 1)
            last = joint
        return (per_agent(normal_sum) - attacked).view(b, w, n)

    # ------------------------------------------------------------ execution

    @torch.no_grad()
    def predict(self, states: torch.Tensor, t: int) -> torch.Tensor:
        """Damage of a cycle started by each agent at each of the next ``period`` steps: states (t+1, S) -> (N, P)."""
        c = self.config
        win = windows(states[None], c.window)[0, -1]  # (W, S)
        times = torch.arange(t - c.window + 1, t + 1).clamp_min(0)
        self.damage.eval()
        out = self.damage(win[None], times[None])[0]
        self.damage.train()
        return out

    def critical(self, states: torch.Tensor, t: int, since_last: int | None, rng: np.random.Generator,
                 rule: WolfpackConfig | None = None):  # fmt: skip
        """Whether to start a cycle now and the planner's initial agent.

        ``rule``: the attack's config, whose timing fields (``temperature``, ``damage_scale``) decide; the planner's
        own config (what it was trained with) when None. One fitted planner serves attacks with different rules."""
        c = rule or self.config
        pred = self.predict(states, t)  # (N, P)
        best, agent = pred.max(0)
        period = self.config.period  # the predictor's outputs
        keep = period if since_last is None else period - min(since_last, period - 1)
        if c.damage_scale == "std" and keep > 1:
            best = best / best[:keep].std().clamp_min(1e-6)
        best = torch.cat([best[:keep], torch.full((period - keep,), NEG)])
        p = torch.softmax(best / c.temperature, 0).double().numpy()
        offset = rng.choice(len(p), p=p / p.sum())
        return offset == 0, int(agent[0])


@torch.enable_grad()
def kl_followups(mac, mixer, inputs: dict, intended: torch.Tensor, initial: int, avail, m: int, lr: float):
    """The m agents whose (standardized) Q would move most if the team compensated for the initial agent.

    ``inputs`` (one environment): obs (1, N, O), last_actions (1, N) or None, hidden_prev (N, H), state (1, S)."""
    probe = copy.deepcopy(mac)
    params = list(probe.parameters())
    q_before, _ = probe.step(inputs["obs"], inputs["last_actions"], inputs["hidden_prev"])  # (1, N, A)
    forced = intended.clone()
    forced[0, initial] = worst_actions(q_before[0, initial], avail[0, initial])
    normal = mixer(q_before.gather(-1, intended.unsqueeze(-1)).squeeze(-1)[:, None], inputs["state"][:, None])
    attacked = mixer(q_before.gather(-1, forced.unsqueeze(-1)).squeeze(-1)[:, None], inputs["state"][:, None])
    loss = (attacked - normal.detach()).pow(2).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    opt = torch.optim.Adam(params, lr=lr)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()
    with torch.no_grad():
        q_after, _ = probe.step(inputs["obs"], inputs["last_actions"], inputs["hidden_prev"])

    def dist(q):
        z = (q - q.mean(-1, keepdim=True)) / q.std(-1, keepdim=True).clamp_min(1e-8)
        return F.log_softmax(z, -1)

    before, after = dist(q_before.detach()[0]), dist(q_after[0])  # (N, A)
    kl = (before.exp() * (before - after)).sum(-1)
    kl[initial] = -float("inf")
    return kl.argsort(descending=True)[:m].tolist()


class WolfpackAttack:
    """The attack as a runner ``action_hook``; ``enabled`` switches it off (clean episodes) without detaching.

    Records per step ``attacked`` (N,: 1 where the agent's action was forced) and ``executed`` (N,)."""

    def __init__(self, runner, mac, mixer, planner: WolfpackPlanner | None, config: WolfpackConfig,
                 lr: float = 5e-4, seed: int = 0):  # fmt: skip
        n = mac.info.n_agents
        if config.followups > n - 1:
            raise ConfigError(
                f"wolfpack followups={config.followups} needs at least {config.followups + 1} agents; "
                f"this environment has {n} (set method_options followups <= {n - 1})"
            )
        if config.step_method == "planner" or config.initial_agent == "planner":
            if planner is None:
                raise ConfigError("the planner-driven wolfpack attack needs a WolfpackPlanner")
        self.runner, self.mac, self.mixer, self.planner, self.config = runner, mac, mixer, planner, config
        self.lr, self.rng, self.enabled = lr, np.random.default_rng(seed), True
        runner.action_hook = self
        runner.store_intended = True
        runner.step_fields = {**runner.step_fields, "attacked": (n,), "executed": (n,)}

    def budget(self) -> int:
        return self.config.test_budget if self.runner.test else self.config.budget

    def _reset(self, envs: int) -> None:
        self.used = np.zeros(envs, int)
        self.remaining = np.zeros(envs, int)  # follow-up steps left in the current cycle
        self.last_initial = [None] * envs
        self.followers: list[list[int]] = [[] for _ in range(envs)]
        self.states: list[list[torch.Tensor]] = [[] for _ in range(envs)]

    def _followups(self, e: int, initial: int, intended, avail) -> list[int]:
        c, n = self.config, self.mac.info.n_agents
        others = [j for j in range(n) if j != initial]
        cur = self.runner.current
        if c.followup == "random":
            return sorted(self.rng.choice(others, c.followups, replace=False).tolist())
        if c.followup == "l2":
            return l2_followups(cur["obs"][e : e + 1], torch.tensor([initial]), c.followups)[0].tolist()
        last = cur["last_actions"]
        inputs = {"obs": cur["obs"][e : e + 1], "last_actions": None if last is None else last[e : e + 1],
                  "hidden_prev": cur["hidden_prev"].view(len(self.used), -1, cur["hidden_prev"].shape[-1])[e],
                  "state": cur["state"][e : e + 1]}  # fmt: skip
        return kl_followups(self.mac, self.mixer, inputs, intended[e : e + 1], initial, avail[e : e + 1],
                            c.followups, self.lr)  # fmt: skip

    def __call__(self, t, actions, q, avail, active):
        envs, n = actions.shape
        c = self.config
        if t == 0:
            self._reset(envs)
        forced = torch.zeros(envs, n, dtype=torch.bool)
        state = self.runner.current["state"]
        for e in np.flatnonzero(active):
            self.states[e].append(state[e])
            if not self.enabled or self.used[e] >= self.budget():
                continue
            if self.remaining[e] > 0:
                forced[e, self.followers[e]] = True
                self.remaining[e] -= 1
            else:
                if c.step_method == "planner":
                    # steps since the previous initial attack; the official runner counts from step 0 before the first
                    since = t - (self.last_initial[e] or 0) if t else None
                    start, agent = self.planner.critical(torch.stack(self.states[e]), t, since, self.rng, c)
                else:
                    start, agent = bool(self.rng.random() < c.random_step_prob), -1
                if not start:
                    continue
                if c.initial_agent == "random" or agent < 0:
                    agent = int(self.rng.integers(n))
                forced[e, agent] = True
                self.last_initial[e] = t
                self.followers[e] = self._followups(e, agent, actions, avail) if c.duration else []
                self.remaining[e] = c.duration
            self.used[e] += 1
        worst = worst_actions(q, avail)
        executed = torch.where(forced, worst, actions)
        self.runner.record("attacked", forced.float().numpy())
        self.runner.record("executed", executed.float().numpy())
        return executed
