"""FoX, formation-aware exploration ("FoX: Formation-aware Exploration in Multi-Agent Reinforcement Learning",
Yonghyeon Jo, Sunwoo Lee, Junghyuk Yeom, Seungyul Han, AAAI 2024, arXiv 2308.11272), on QMIX.

The joint state space grows exponentially with the number of agents, but many states are the same up to the team's
*formation*. FoX counts visits of formations (:mod:`leantrain.marl.fox_formation`: a rounded-distance + SimHash key
of the agents' observations, counted in training episodes only) and rewards new ones, r^visit = 1/sqrt(N(F)) minus
its batch maximum; and it makes every agent *aware* of the formation from its own history with a VAE whose
mutual-information estimate is a second reward r^form (:mod:`leantrain.marl.fox_vae`). The agents' utilities are
Q^i = shared(h_i) + local_i(h_i) + formation(z_i), with h_i the GRU output and z_i the VAE encoder's latent of it
(:class:`FoxAgent`), and a 0.1 L1 penalty keeps the local heads small. One update (:class:`FoxLearner`):

    y = r + Σ_i beta2 r^form_i + beta1 r^visit + γ Q_tot^target(s', argmax Q(s'))   (QMIX, double Q)
    L = masked MSE(Q_tot, y) + 0.1 · mean |local_i(h_i)|

then 25 single-sample VAE updates on the same batch. Defaults are the official ``FOX_QMIX.yaml`` (SMAC): beta1
0.01, beta2 0.02, distances rounded to 1 decimal, latent 64, ``predict_net_dim`` 128, 20 noise samples.

Deliberate departures from the official code (github ``hyeon1996/FoX``, ``FOX_SMAC/src``), each because the code
contradicts its own intent or our core:

- The far/near teammates' histories in r^form are the histories of those agents at the same step. The official
  learner indexes ``history[b, idx_max, agent]``, i.e. the *same* agent at time step ``idx_max``.
- The formation is compared with the decoder's scale in r^form: log q = −||D − F/1000||² (the decoder is trained
  on F/1000 with a sigmoid output); the official reward compares it with the unscaled F. ``raw`` is not offered.
- The normalizer's mean is the mean of log q over real steps and samples; the official expression
  ``sum / size(0) - nan_count`` divides by the batch size only (operator precedence); max, min and mean of r^form
  are taken over real steps only (the official ones include padding).
- ``encoder_gradient="paper"`` (default): each VAE loss reaches only its own module and the encoder descends
  L_F − 0.1 L_τ. The official three ``backward`` calls accumulate into shared gradients, so its encoder actually
  descends 2 L_F + 0.9 L_τ (no gradient flip); ``encoder_gradient="code"`` reproduces that.
- The 25 VAE samples are drawn among real steps (the official draw may land on padding).
- Formation keys: ties are broken by content, and the farthest agent is one of the *others* (see
  :mod:`leantrain.marl.fox_formation`), so the key does not depend on the other agents' order; the formation of the
  step's *next* observation is recorded and counted at that step (the official learner reads slot t+1 for step t,
  and the episode's last step reads an empty slot: count 0, formation 0).
- FoX's agent replaces the controller's agent network when the learner is built (``marl.agent`` must stay ``rnn``):
  the registered agent builders get ``(input_dim, n_actions, hidden)``, but the local heads need the number of agents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.marl.controller import MultiAgentController, greedy
from leantrain.marl.episodes import EpisodeBatch
from leantrain.marl.fox_formation import FormationCounter, visit_bonus
from leantrain.marl.fox_vae import FormationEncoder, FormationVAE
from leantrain.marl.learner import LearnerConfig, QLearner
from leantrain.marl.networks import RNNAgent


@dataclass
class FoxConfig:
    beta1: float = 0.01  # weight of the visit bonus r^visit (official SMAC config; GRF also 0.01)
    beta2: float = 0.02  # weight of the formation-awareness reward r^form (SMAC 0.02; GRF 0.01)
    round_decimals: int = 1  # distances between observations rounded to this many decimals (official ``round``)
    hash_bits: int = 9  # rows of the SimHash projection
    projection: str = "uniform"  # "uniform": [0, 1) as the official code; "gaussian": the usual SimHash
    latent: int = 64  # VAE latent
    predict_net_dim: int = 128  # VAE hidden width
    reward_samples: int = 20  # noise samples of the MI estimate
    vae_updates: int = 25  # single-sample VAE updates after every TD update
    vae_lr: float = 1e-3
    vae_grad_clip: float = 1.0
    tau_weight: float = 0.1  # encoder loss = L_F - tau_weight * L_tau
    local_l1: float = 0.1  # weight of the L1 penalty on the local heads
    formation_scale: float = 1000.0  # the decoder predicts F / formation_scale
    encoder_gradient: str = "paper"  # "paper" | "code" (the official accumulated gradients)

    def __post_init__(self):
        for name in ("beta1", "beta2", "tau_weight", "local_l1"):
            if getattr(self, name) < 0:
                raise ConfigError(f"FoX {name}={getattr(self, name)!r} must be >= 0")
        for name in ("hash_bits", "latent", "predict_net_dim", "reward_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"FoX {name}={getattr(self, name)!r} must be an integer >= 1")
        if not isinstance(self.vae_updates, int) or self.vae_updates < 0:
            raise ConfigError(f"FoX vae_updates={self.vae_updates!r} must be an integer >= 0")
        if not isinstance(self.round_decimals, int) or self.round_decimals < 0:
            raise ConfigError(f"FoX round_decimals={self.round_decimals!r} must be an integer >= 0")
        if self.projection not in ("uniform", "gaussian"):
            raise ConfigError(f"FoX projection={self.projection!r} must be 'uniform' or 'gaussian'")
        if self.encoder_gradient not in ("paper", "code"):
            raise ConfigError(f"FoX encoder_gradient={self.encoder_gradient!r} must be 'paper' or 'code'")
        if not self.vae_lr > 0 or not self.vae_grad_clip > 0 or not self.formation_scale > 0:
            raise ConfigError("FoX needs vae_lr, vae_grad_clip and formation_scale > 0")


class FoxAgent(RNNAgent):
    """Q^i = shared(h) + local_i(h) + formation(z), z ~ the VAE encoder of h (sampled, as the official agent).

    The agent's index is read from the one-hot id at the end of the controller's inputs. The TD loss reaches the
    GRU through the encoder, but the encoder's weights are trained by the VAE only (the learner's optimizer leaves
    them out, as the official one)."""

    def __init__(self, input_dim: int, n_actions: int, hidden: int, n_agents: int, latent: int = 64,
                 predict_dim: int = 128):  # fmt: skip
        super().__init__(input_dim, n_actions, hidden)
        self.n_agents = n_agents
        self.local = nn.ModuleList([nn.Linear(hidden, n_actions) for _ in range(n_agents)])
        self.formation_head = nn.Linear(latent, n_actions)
        self.encoder = FormationEncoder(hidden, predict_dim, latent)

    def local_q(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each row's own local head: hidden (M, ..., H), ids (M,) -> (M, ..., A)."""
        weight = torch.stack([head.weight for head in self.local])[ids]  # (M, A, H)
        bias = torch.stack([head.bias for head in self.local])[ids]  # (M, A)
        m = hidden.shape[0]
        out = torch.bmm(hidden.reshape(m, -1, hidden.shape[-1]), weight.transpose(1, 2)) + bias[:, None]
        return out.reshape(*hidden.shape[:-1], -1)

    def _ids(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs[..., -self.n_agents :].reshape(inputs.shape[0], -1, self.n_agents)[:, 0].argmax(-1)

    def _q(self, shared: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        z, _, _ = self.encoder(hidden)
        return shared + self.local_q(hidden, ids) + self.formation_head(z)

    def forward(self, inputs: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared, h = super().forward(inputs, h)
        return self._q(shared, h, self._ids(inputs)), h

    def unroll(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared, hidden = super().unroll(inputs)  # (M, T, A), (M, T, H)
        return self._q(shared, hidden, self._ids(inputs)), hidden


def install_fox_agent(mac: MultiAgentController, config: FoxConfig) -> FoxAgent:
    """Replace the controller's agent network with :class:`FoxAgent` of the same width (before the learner copies it
    into its target network)."""
    if mac.agent_name != "rnn":
        raise ConfigError(f"FoX brings its own agent network; marl.agent={mac.agent_name!r} must be 'rnn'")
    info = mac.info
    mac.agent = FoxAgent(info.obs_dim + info.n_actions + info.n_agents, info.n_actions, mac.agent.hidden,
                         info.n_agents, config.latent, config.predict_net_dim)  # fmt: skip
    return mac.agent


class FoxLearner(QLearner):
    """QMIX with FoX's rewards, agent decomposition and VAE (see the module docstring). Call :meth:`attach` on the
    training runner so that its episodes record formations."""

    def __init__(self, mac: MultiAgentController, config: LearnerConfig, fox: FoxConfig | None = None, seed: int = 0):
        self.fox = fox or FoxConfig()
        agent = mac.agent if isinstance(mac.agent, FoxAgent) else install_fox_agent(mac, self.fox)
        super().__init__(mac, config)
        encoder = set(agent.encoder.parameters())
        self.params = [p for p in self.params if p not in encoder]  # the encoder learns from the VAE only
        self.optimizer = self.make_optimizer(self.params)
        f, info = self.fox, mac.info
        self.vae = FormationVAE(agent.encoder, info.n_agents, agent.hidden, f.predict_net_dim, f.latent, f.vae_lr,
                                f.tau_weight, f.vae_grad_clip, f.formation_scale, f.encoder_gradient)  # fmt: skip
        self.counter = FormationCounter(info.n_agents, info.obs_dim, f.round_decimals, f.hash_bits, f.projection, seed)
        self.rng = np.random.default_rng(seed)
        self._unrolled: tuple[EpisodeBatch, torch.Tensor] | None = None
        self.last_bonus: dict[str, float] = {}

    def attach(self, runner) -> FormationCounter:
        """Count and record the formations of ``runner``'s training episodes."""
        self.counter.attach(runner)
        return self.counter

    # ------------------------------------------------------------ rewards

    def histories(self, batch: EpisodeBatch) -> torch.Tensor:
        """The agents' GRU outputs after each step's next observation, (B, T, N, H) (slots 1..T)."""
        if self._unrolled is not None and self._unrolled[0] is batch:
            return self._unrolled[1]
        with torch.no_grad():
            return self.mac.unroll(batch["obs"], batch["actions"], hidden=True)[1][:, 1:]

    def intrinsic_reward(self, batch: EpisodeBatch) -> torch.Tensor:
        """beta1 r^visit + Σ_i beta2 r^form_i, (B, T)."""
        f, filled = self.fox, batch["filled"]
        visit = f.beta1 * visit_bonus(batch["step_fox_visit"][..., 0], filled)
        form = torch.zeros_like(visit)
        if f.beta2 > 0:
            per_agent = self.vae.awareness_reward(self.histories(batch), batch["step_fox_formation"],
                                                  batch["step_fox_far"], batch["step_fox_near"], filled,
                                                  f.reward_samples)  # fmt: skip
            form = f.beta2 * per_agent.sum(-1)
        real = filled.sum().clamp_min(1)
        self.last_bonus = {"visit_reward": float((visit * filled).sum() / real),
                           "formation_reward": float((form * filled).sum() / real)}  # fmt: skip
        return (visit + form) * filled

    # ------------------------------------------------------------ the update

    def td_loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, dict]:
        """QMIX's loss (as :meth:`QLearner.td_loss`) from one unroll that also gives the histories of r^form, the
        VAE's training samples and the local heads' L1 penalty."""
        actions, avail, filled = batch["actions"], batch["avail"], batch["filled"]
        q, hidden = self.mac.unroll(batch["obs"], actions, hidden=True)  # (B, T+1, N, A), (B, T+1, N, H)
        chosen = q[:, :-1].gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (B, T, N)
        self._unrolled = (batch, hidden[:, 1:].detach())
        try:
            with torch.no_grad():
                # the target agents' formation head reads the online encoder, as the official target forward
                self.target_mac.agent.encoder.load_state_dict(self.mac.agent.encoder.state_dict())
                target_q = self.target_mac.unroll(batch["obs"], actions)
                pick = greedy(q.detach() if self.config.double_q else target_q, avail)
                target_chosen = target_q.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
                target_qtot = self.target_mixer(target_chosen, batch["state"])  # (B, T+1)
                y = self.targets(batch, q, target_qtot)
        finally:
            self._unrolled = None
        qtot = self.mixer(chosen, batch["state"][:, :-1])  # (B, T)
        td = ((qtot - y) * filled).pow(2).sum() / filled.sum()
        agent, n = self.mac.agent, self.mac.info.n_agents
        local = agent.local_q(hidden[:, :-1].transpose(0, 2), torch.arange(n))  # (N, T, B, A)
        real = filled.transpose(0, 1)[None, :, :, None].expand_as(local)
        l1 = (local.abs() * real).sum() / real.sum()
        losses = {"td": td.detach(), "local_l1": l1.detach()}
        return td + self.fox.local_l1 * l1, {"q": q, "chosen": chosen, "qtot": qtot, "targets": y,
                                              "hidden": hidden, "losses": losses}  # fmt: skip

    def train(self, batch: EpisodeBatch, episodes: int) -> dict[str, float]:
        """One TD update, then ``vae_updates`` single-sample VAE updates on the same batch."""
        batch = batch.trimmed()
        stats = super().train(batch, episodes)
        stats.update(self.last_bonus)
        if self.fox.vae_updates:
            hidden = self.histories(batch)
            stats["vae_loss"] = self.vae.fit(hidden, batch["step_fox_formation"], batch["step_fox_far"],
                                             batch["step_fox_near"], batch["filled"], self.rng,
                                             self.fox.vae_updates)  # fmt: skip
        stats["formations"] = len(self.counter.counts)
        return stats

    # ------------------------------------------------------------ saving and restoring

    def networks(self) -> dict[str, nn.Module]:
        return {**super().networks(), "fnet": self.vae}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        v = self.vae
        return {**super().optimizers(), "fnet_decoder": v.decoder_opt, "fnet_history": v.history_opt,
                "fnet_encoder": v.encoder_opt}  # fmt: skip

    def training_state(self) -> dict:
        return {**super().training_state(), "formation_counts": self.counter.state(),
                "fox_rng": self.rng.bit_generator.state, "normalizer_max": self.vae.normalizer_max}  # fmt: skip

    def load_training_state(self, state: dict) -> None:
        super().load_training_state(state)
        self.counter.load_state(state["formation_counts"])
        self.rng.bit_generator.state = state["fox_rng"]
        self.vae.normalizer_max = state["normalizer_max"]
