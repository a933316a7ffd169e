"""S2Q, Successive Sub-value Q-learning (arXiv 2602.17062): keep valuing the runner-up joint actions so that a
shifting optimum is followed at once.

Besides the usual QMIX value Q¹ (used greedily at test time), S2Q learns K more sub-values Q², ..., Q^{K+1}, each
trained to represent the best joint action left once the greedy joint actions of the earlier ones are
suppressed, plus an unrestricted central critic Q* (WQMIX-style) that values any joint action, and a small
encoder-decoder that predicts, from the agents' hidden states, which sub-value's greedy action is best. With
ā^k the greedy joint action of sub-value k:

- target (shared): y = TD(λ = 0.6) return bootstrapped with Q*_tgt(s', ā¹(s'));
- L* = mean (Q*(s, a) − y)²;
- L1 = mean w1 (Q¹_tot(s, a) − y)², w1 = 1 if Q*(s, a) ≥ Q*_tgt(s, ā^k) for every k, else w_c (``w_c_first``
  when set);
- L_{k+1} = mean w (Q^{k+1}_tot(s, a) − [y − 1[a ∈ {ā¹..ā^k}] Q*(s, a)])², w = 1 where the sub-value is below
  its target, else w_c (suppression: the earlier greedy actions are pushed towards 0);
- L_latent = KL(softmax(Q*_tgt(s, ā^k)/T)_k ‖ P̂) + MSE(ŝ, s) with (P̂, ŝ) decoded from the Q¹ agents' hidden states;
  the KL is averaged over the K + 1 entries as the official ``F.kl_div(..., reduction="mean")``
  (``latent_kl="sum"``: summed, K + 1 times the weight), masked over real steps;
- behaviour (training only): with probability 0.5 act greedily on Q¹, else at every step sample k ~ P̂ (shared
  by the agents) and execute ā^k; epsilon-greedy on top. The mode is drawn once per runner batch (the official
  parallel runner; ``behaviour_draw="episode"``: per environment). Test: greedy on Q¹.

All losses are summed and optimized with one Adam (lr 1e-3), gradient clip 10. Defaults: K = 2, T = 0.1,
w_c = 0.9, TD(λ) 0.6 (the official ``s2q.yaml``, tuned for SMAC and GRF). **On matrix games use w_c = 0.1**
(the ``s2q-climbing`` recipe): with 0.9 every sub-value is nearly an unweighted QMIX fit of a replay concentrated
on the safe joint action and S2Q behaves like QMIX (docs/marl.md measures it). ``w_c_first`` sets Q¹'s weight
apart from the sub-values' (the docs' split: the sub-values' weight is what lets S2Q find the optimum, Q¹'s alone
is WQMIX's weighting).

Deliberate departures and choices:

- Suppression subtracts the central Q*(s, a) itself, as the official code; ``suppression="paper"`` subtracts a
  constant ``alpha`` instead (the paper's description).
- K = 0 leaves nothing to suppress or select: S2Q is then exactly QMIX (same targets, same loss; tested).
- The central critic's agent network has one output per action (the official ``central_action_embed`` = 1)
  and its mixer is a 3 × 256 feed-forward network on [state, chosen Qs] plus a state-value head.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leantrain.errors import ConfigError
from leantrain.marl.controller import MultiAgentController, epsilon_greedy, greedy
from leantrain.marl.episodes import EpisodeBatch
from leantrain.marl.learner import LearnerConfig, QLearner
from leantrain.marl.networks import QMixer
from leantrain.marl.targets import td_lambda_targets


@dataclass
class S2QConfig:
    k: int = 2  # extra sub-values
    temperature: float = 0.1
    w_c: float = 0.9
    w_c_first: float | None = None  # Q¹'s weight when not w_c (the split of docs/marl.md)
    greedy_episode_prob: float = 0.5
    behaviour_draw: str = "batch"  # "batch": one greedy/mixed draw per runner batch (official); "episode"
    latent_kl: str = "mean"  # "mean": KL averaged over the K+1 entries (official); "sum"
    suppression: str = "code"  # "code": subtract Q*(s, a); "paper": subtract alpha
    alpha: float = 1.0
    central_embed: int = 256
    latent: int = 32

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 0:
            raise ConfigError(f"S2Q k={self.k!r} must be an integer >= 0")
        if self.suppression not in ("code", "paper"):
            raise ConfigError(f"S2Q suppression={self.suppression!r} must be 'code' or 'paper'")
        if not self.temperature > 0 or not 0 <= self.w_c <= 1:
            raise ConfigError("S2Q needs temperature > 0 and w_c in [0, 1]")
        if self.w_c_first is not None and not 0 <= self.w_c_first <= 1:
            raise ConfigError(f"S2Q w_c_first={self.w_c_first!r} must be in [0, 1] (or unset: w_c)")
        if self.behaviour_draw not in ("batch", "episode"):
            raise ConfigError(f"S2Q behaviour_draw={self.behaviour_draw!r} must be 'batch' or 'episode'")
        if self.latent_kl not in ("mean", "sum"):
            raise ConfigError(f"S2Q latent_kl={self.latent_kl!r} must be 'mean' or 'sum'")


class CentralMixer(nn.Module):
    """Unrestricted Q*(s, a): a feed-forward net on [state, per-agent Qs of the joint action] plus V(s)."""

    def __init__(self, n_agents: int, state_dim: int, embed: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim + n_agents, embed), nn.ReLU(), nn.Linear(embed, embed), nn.ReLU(),
                                 nn.Linear(embed, embed), nn.ReLU(), nn.Linear(embed, 1))  # fmt: skip
        self.v = nn.Sequential(nn.Linear(state_dim, embed), nn.ReLU(), nn.Linear(embed, 1))

    def forward(self, agent_qs: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """agent_qs (B, T, N), states (B, T, S) -> (B, T)."""
        return (self.net(torch.cat([states, agent_qs], -1)) + self.v(states)).squeeze(-1)


class SubValueSelector(nn.Module):
    """Encoder-decoder on the concatenated hidden states of all agents: P̂ over the K+1 sub-values and ŝ."""

    def __init__(self, n_agents: int, hidden: int, state_dim: int, choices: int, latent: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_agents * hidden, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                     nn.Linear(64, latent))  # fmt: skip
        self.decoder = nn.Sequential(nn.Linear(latent, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.state_head = nn.Linear(64, state_dim)
        self.choice_head = nn.Linear(64, choices)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (..., N, H) -> (log P̂ (..., K+1), ŝ (..., S))."""
        z = self.decoder(self.encoder(hidden.flatten(-2)))
        return F.log_softmax(self.choice_head(z), -1), self.state_head(z)


def _joint_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 where the joint actions agree for every agent: (..., N) -> (...)."""
    return (a == b).all(-1).float()


class S2QLearner(QLearner):
    def __init__(self, mac: MultiAgentController, config: LearnerConfig, s2q: S2QConfig | None = None):
        super().__init__(mac, config)
        self.s2q = s2q or S2QConfig()
        if self.s2q.k == 0:
            return  # exactly QMIX
        info = mac.info
        hidden = mac.agent.hidden
        self.subs = [mac] + [mac.like() for _ in range(self.s2q.k)]
        self.sub_mixers = [self.mixer] + [QMixer(info.n_agents, info.state_dim) for _ in range(self.s2q.k)]
        self.central_agent = MultiAgentController(info, hidden)
        self.central_mixer = CentralMixer(info.n_agents, info.state_dim, self.s2q.central_embed)
        self.selector = SubValueSelector(info.n_agents, hidden, info.state_dim, self.s2q.k + 1, self.s2q.latent)
        self.target_central_agent = copy.deepcopy(self.central_agent)
        self.target_central_mixer = copy.deepcopy(self.central_mixer)
        modules = [*self.subs, *self.sub_mixers, self.central_agent, self.central_mixer, self.selector]
        self.params = [p for m in modules for p in m.parameters()]
        self.optimizer = self.make_optimizer(self.params)

    # ------------------------------------------------------------ learning

    @staticmethod
    def _central(mixer: CentralMixer, q: torch.Tensor, joint: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Q*(s, joint) from the central agent Qs q (B, T, N, A) and joint actions (B, T, N) -> (B, T)."""
        return mixer(q.gather(-1, joint.unsqueeze(-1)).squeeze(-1), states)

    def td_loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, dict]:
        if self.s2q.k == 0:
            return super().td_loss(batch)
        c, s2q = self.config, self.s2q
        actions, avail, filled, states = batch["actions"], batch["avail"], batch["filled"], batch["state"]
        obs = batch["obs"]
        sub_q, hidden = [], None
        for i, sub in enumerate(self.subs):
            if i == 0:
                q, hidden = sub.unroll(obs, actions, hidden=True)  # (B, T+1, N, A), (B, T+1, N, H)
            else:
                q = sub.unroll(obs, actions)
            sub_q.append(q)
        greedy_joint = [greedy(q.detach(), avail) for q in sub_q]  # ā^k, each (B, T+1, N)
        central_q = self.central_agent.unroll(obs, actions)  # (B, T+1, N, A)
        q_star = self._central(self.central_mixer, central_q[:, :-1], actions, states[:, :-1])
        with torch.no_grad():
            target_central_q = self.target_central_agent.unroll(obs, actions)
            # Q*_tgt at every slot for every sub-value's greedy joint action: (K+1, B, T+1)
            q_star_greedy = torch.stack(
                [self._central(self.target_central_mixer, target_central_q, g, states) for g in greedy_joint]
            )
            y = td_lambda_targets(self.rewards(batch), batch["terminated"], filled, q_star_greedy[0], c.gamma,
                                 c.td_lambda)  # fmt: skip
        mask_sum = filled.sum()
        losses = {"central": ((q_star - y) * filled).pow(2).sum() / mask_sum}
        taken_star = q_star.detach()
        best = (taken_star.unsqueeze(0) >= q_star_greedy[:, :, :-1]).all(0).float()  # (B, T)
        for i, (q, mixer) in enumerate(zip(sub_q, self.sub_mixers, strict=True)):
            chosen = q[:, :-1].gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (B, T, N)
            qtot = mixer(chosen, states[:, :-1])  # (B, T)
            if i == 0:
                w_first = s2q.w_c if s2q.w_c_first is None else s2q.w_c_first
                target, w = y, best + (1 - best) * w_first
            else:
                hit = torch.clamp(sum(_joint_equal(actions, g[:, :-1]) for g in greedy_joint[:i]), max=1.0)
                amount = taken_star if s2q.suppression == "code" else torch.full_like(y, s2q.alpha)
                target = y - hit * amount
                w = torch.where(qtot.detach() < target, torch.ones_like(y), torch.full_like(y, s2q.w_c))
            losses[f"sub{i + 1}"] = (w * (qtot - target).pow(2) * filled).sum() / mask_sum
        log_p, state_hat = self.selector(hidden[:, :-1].detach())  # (B, T, K+1), (B, T, S)
        p_k = F.softmax(q_star_greedy[:, :, :-1].permute(1, 2, 0) / s2q.temperature, -1)  # (B, T, K+1)
        kl = (p_k * (torch.log(p_k.clamp_min(1e-12)) - log_p)).sum(-1)
        if s2q.latent_kl == "mean":
            kl = kl / (s2q.k + 1)
        mse = (state_hat - states[:, :-1]).pow(2).mean(-1)
        losses["latent"] = ((kl + mse) * filled).sum() / mask_sum
        total = sum(losses.values())
        return total, {"losses": {k: v.detach() for k, v in losses.items()}}

    def update_targets(self) -> None:
        super().update_targets()
        if self.s2q.k:
            self.target_central_agent.load_state_dict(self.central_agent.state_dict())
            self.target_central_mixer.load_state_dict(self.central_mixer.state_dict())

    def policy_parts(self) -> dict[str, nn.Module]:
        parts = super().policy_parts()
        if self.s2q.k:
            for i, (sub, mixer) in enumerate(zip(self.subs[1:], self.sub_mixers[1:], strict=True), start=2):
                parts[f"sub{i}_mac"], parts[f"sub{i}_mixer"] = sub, mixer
            parts.update(central_agent=self.central_agent, central_mixer=self.central_mixer, selector=self.selector)
        return parts

    def networks(self) -> dict[str, nn.Module]:
        nets = {**super().networks(), **self.policy_parts()}
        if self.s2q.k:
            nets.update(target_central_agent=self.target_central_agent, target_central_mixer=self.target_central_mixer)
        return nets

    @torch.no_grad()
    def sub_value_greedy(self, obs: torch.Tensor, avail: torch.Tensor) -> list[list[int]]:
        """Every sub-value's greedy joint action at an episode's first step: obs (N, O), avail (N, A)."""
        subs = self.subs if self.s2q.k else [self.mac]
        return [greedy(sub.step(obs[None], None, sub.init_hidden(1))[0], avail[None])[0].tolist() for sub in subs]

    def test_stats(self, runner) -> dict:
        """The sub-values' greedy joint actions at the first step of the runner's first environment (seed 0): which
        joint actions S2Q keeps valued over training (docs/marl.md's matrix-game split)."""
        first = runner.envs[0].reset(seed=0)
        return {"sub_value_greedy": self.sub_value_greedy(torch.as_tensor(first.obs), torch.as_tensor(first.avail))}

    # ------------------------------------------------------------ behaviour policy

    def behaviour_hook(self, runner, seed: int = 0) -> S2QBehaviour:
        """The runner hook of S2Q's training behaviour (greedy-Q¹ or sampled-sub-value episodes)."""
        return S2QBehaviour(self, runner, seed)


class S2QBehaviour:
    """S2Q's training behaviour as a runner hook: greedy on Q¹ (probability ``greedy_episode_prob``, drawn once per
    runner batch or per environment) or, every step, the greedy joint action of a sub-value sampled from the
    selector, epsilon-greedy on top."""

    def __init__(self, learner: S2QLearner, runner, seed: int = 0):
        self.learner, self.runner = learner, runner
        self.rng = np.random.default_rng(seed)
        self.mixed: np.ndarray | None = None
        self.hidden: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, t, actions, q, avail, active):
        learner, runner = self.learner, self.runner
        if learner.s2q.k == 0 or runner.test:
            return actions
        cur = runner.current
        e = actions.shape[0]
        if t == 0:
            draws = 1 if learner.s2q.behaviour_draw == "batch" else e
            self.mixed = np.broadcast_to(self.rng.random(draws) >= learner.s2q.greedy_episode_prob, (e,)).copy()
            self.hidden = [sub.init_hidden(e) for sub in learner.subs[1:]]
        joints = [greedy(q, avail)]
        for i, sub in enumerate(learner.subs[1:]):
            q_i, self.hidden[i] = sub.step(cur["obs"], cur["last_actions"], self.hidden[i])
            joints.append(greedy(q_i, avail))
        log_p, _ = learner.selector(cur["hidden"].view(e, learner.mac.info.n_agents, -1))
        generator = torch.Generator().manual_seed(int(self.rng.integers(2**31)))
        choice = torch.multinomial(log_p.exp(), 1, generator=generator)
        picked = torch.stack(joints)[choice.squeeze(-1), torch.arange(e)]  # (E, N)
        explored = epsilon_greedy(
            torch.zeros_like(q).scatter_(-1, picked.unsqueeze(-1), 1.0), avail, cur["epsilon"], self.rng
        )
        return torch.where(torch.as_tensor(self.mixed)[:, None], explored, actions)
