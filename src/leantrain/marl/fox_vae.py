"""FoX's formation-awareness VAE, FNet ("FoX: Formation-aware Exploration in Multi-Agent Reinforcement Learning",
Jo et al., AAAI 2024, arXiv 2308.11272).

A partially observable agent should know, from its own history, which formation the team is in. The encoder maps an
agent's GRU output τ_i to a latent z_i (reparameterized Gaussian, two ReLU layers of ``predict_dim`` = 128, latent
64). The formation decoder predicts F/1000 (sigmoid, 4N outputs) from (z_i, z_far, z_near), the latents of the
agent and of its farthest and nearest teammates; the history decoder reconstructs τ_i from z_i. Losses of one update
(single samples, 25 per learner update, Adam 1e-3 each, gradient clip 1.0 over the whole VAE):

- decoder loss  L_F = MSE(D(z_i, z_far, z_near), F/1000) + KL_i + KL_far + KL_near,
- history loss  L_τ = MSE(D_τ(z_i), τ_i) + KL_i,
- encoder loss  L_E = L_F − 0.1 L_τ (keep what identifies the formation, drop the rest of the history).

The formation-awareness reward of agent i is a variational mutual-information estimate,
r^form_i = log q(F | z_i, z_far, z_near) − (1/3)[log q(F | z_i, ε, ε') + log q(F | ε, z_far, ε') +
log q(F | ε, ε', z_near)] with log q = −||D(·) − F/1000||², ε, ε' ~ N(0, I), over 20 samples; shifted by its batch
maximum and divided by the batch range (values in [−1, 0]), scaled by |mean log q| / (running max of it), averaged
over the samples (:meth:`FormationVAE.awareness_reward`). Departures are listed in :mod:`leantrain.marl.fox`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class FormationEncoder(nn.Module):
    """τ (..., hidden) -> (z, mean, log_var) (..., latent), z = mean + exp(log_var / 2) ε."""

    def __init__(self, hidden: int, predict_dim: int = 128, latent: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(hidden, predict_dim), nn.ReLU(), nn.Linear(predict_dim, predict_dim),
                                  nn.ReLU())  # fmt: skip
        self.mean, self.log_var = nn.Linear(predict_dim, latent), nn.Linear(predict_dim, latent)

    def moments(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(tau)
        return self.mean(h), self.log_var(h)

    def forward(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_var = self.moments(tau)
        return mean + torch.exp(0.5 * log_var) * torch.randn_like(mean), mean, log_var


def _decoder(inputs: int, predict_dim: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, predict_dim), nn.ReLU(), nn.Linear(predict_dim, predict_dim), nn.ReLU(),
                         nn.Linear(predict_dim, outputs), nn.Sigmoid())  # fmt: skip


def _kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) summed over the latent (and any leading) dims, as the official code."""
    return -0.5 * torch.sum(1 + log_var - mean.pow(2) - log_var.exp())


class FormationVAE(nn.Module):
    """The two decoders of FNet; the encoder lives in the agent network (its latent feeds the formation Q head) and
    is passed in, so no tensor is saved twice. ``encoder_gradient``: "paper" (each loss reaches only its own
    module: L_F the decoder, L_τ the history decoder, L_E the encoder) or "code" (the official three backward
    calls accumulated into shared gradients: decoder 2∇L_F, history decoder 0.9∇L_τ, encoder ∇(2L_F + 0.9L_τ))."""

    def __init__(self, encoder: FormationEncoder, n_agents: int, hidden: int, predict_dim: int = 128,
                 latent: int = 64, lr: float = 1e-3, tau_weight: float = 0.1, grad_clip: float = 1.0,
                 formation_scale: float = 1000.0, encoder_gradient: str = "paper"):  # fmt: skip
        super().__init__()
        self.decoder = _decoder(3 * latent, predict_dim, 4 * n_agents)
        self.history_decoder = _decoder(latent, predict_dim, hidden)
        self.latent, self.tau_weight, self.grad_clip = latent, tau_weight, grad_clip
        self.formation_scale, self.encoder_gradient = formation_scale, encoder_gradient
        self._encoder = [encoder]  # not a submodule: it is saved with the agent network
        self.decoder_opt = torch.optim.Adam(self.decoder.parameters(), lr=lr)
        self.history_opt = torch.optim.Adam(self.history_decoder.parameters(), lr=lr)
        self.encoder_opt = torch.optim.Adam(encoder.parameters(), lr=lr)
        self.normalizer_max = 0.0  # running max of |mean log q| (the official ``diversity_mean``)

    @property
    def encoder(self) -> FormationEncoder:
        return self._encoder[0]

    def decode(self, z_i: torch.Tensor, z_far: torch.Tensor, z_near: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z_i, z_far, z_near], -1))

    # ------------------------------------------------------------ training

    def losses(self, tau: torch.Tensor, formation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_F, L_τ) of one sample: tau (3, hidden) = histories of (i, far, near), formation (4N,) unscaled."""
        z, mean, log_var = self.encoder(tau)  # (3, latent)
        predicted = self.decode(z[0], z[1], z[2])
        formation_loss = F.mse_loss(predicted, formation / self.formation_scale) + _kl(mean, log_var)
        history_loss = F.mse_loss(self.history_decoder(z[0]), tau[0]) + _kl(mean[0], log_var[0])
        return formation_loss, history_loss

    def update(self, tau: torch.Tensor, formation: torch.Tensor) -> float:
        """One single-sample update of all three parts; returns L_F."""
        formation_loss, history_loss = self.losses(tau, formation)
        dec, hist, enc = (list(m.parameters()) for m in (self.decoder, self.history_decoder, self.encoder))
        if self.encoder_gradient == "code":
            parts = (
                (dec, 2 * formation_loss),
                (hist, 0.9 * history_loss),
                (enc, 2 * formation_loss + 0.9 * history_loss),
            )
        else:
            parts = (
                (dec, formation_loss),
                (hist, history_loss),
                (enc, formation_loss - self.tau_weight * history_loss),
            )
        for k, (params, loss) in enumerate(parts):
            grads = torch.autograd.grad(loss, params, retain_graph=k < len(parts) - 1)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
        nn.utils.clip_grad_norm_(dec + hist + enc, self.grad_clip)
        for opt in (self.decoder_opt, self.history_opt, self.encoder_opt):
            opt.step()
        return formation_loss.item()

    def fit(self, hidden: torch.Tensor, formation: torch.Tensor, far: torch.Tensor, near: torch.Tensor,
            filled: torch.Tensor, rng: np.random.Generator, updates: int = 25) -> float:  # fmt: skip
        """``updates`` single-sample updates on random (episode, real step, agent) of a batch; mean L_F.

        hidden (B, T, N, H): the agents' histories after each step's observation; formation (B, T, 4N); far, near
        (B, T, N) agent indices; filled (B, T)."""
        real = torch.nonzero(filled > 0)  # (K, 2)
        if len(real) == 0:
            return float("nan")
        n = hidden.shape[2]
        hidden = hidden.detach()
        losses = []
        for _ in range(updates):
            b, t = real[int(rng.integers(len(real)))].tolist()
            i = int(rng.integers(n))
            rows = [i, int(far[b, t, i]), int(near[b, t, i])]
            losses.append(self.update(hidden[b, t, rows], formation[b, t]))
        return float(np.mean(losses))

    # ------------------------------------------------------------ the reward

    @torch.no_grad()
    def awareness_reward(self, hidden: torch.Tensor, formation: torch.Tensor, far: torch.Tensor, near: torch.Tensor,
                         filled: torch.Tensor, samples: int = 20) -> torch.Tensor:  # fmt: skip
        """r^form per agent before beta2: (B, T, N), each agent's values in [−1, 0] times its normalizer.

        hidden (B, T, N, H) histories after each step's observation, formation (B, T, 4N), far/near (B, T, N),
        filled (B, T)."""
        b, t, n, h = hidden.shape
        target = (formation / self.formation_scale)[:, :, None, None]  # (B, T, 1, 1, 4N)
        gather = hidden[:, :, None].expand(b, t, n, n, h)  # (B, T, N_i, N_j, H)

        def pick(idx: torch.Tensor) -> torch.Tensor:  # the history of agent idx[b, t, i] at the same step
            return gather.gather(3, idx.long()[..., None, None].expand(b, t, n, 1, h)).squeeze(3)

        mean, log_var = self.encoder.moments(torch.stack([hidden, pick(far), pick(near)]))  # (3, B, T, N, L)
        std = torch.exp(0.5 * log_var)
        z = mean[..., None, :] + std[..., None, :] * torch.randn(3, b, t, n, samples, self.latent)
        z_i, z_far, z_near = z  # each (B, T, N, S, L)
        eps1, eps2 = torch.randn_like(z_i), torch.randn_like(z_i)
        # the first decoder layer is linear in (z_i, z_far, z_near): project each latent once, not per combination
        first, rest = self.decoder[0], self.decoder[1:]
        w_i, w_far, w_near = first.weight.split(self.latent, 1)
        a_z, a_e = z_i @ w_i.T, eps1 @ w_i.T
        b_z, b_e1, b_e2 = z_far @ w_far.T, eps1 @ w_far.T, eps2 @ w_far.T
        c_z, c_e = z_near @ w_near.T, eps2 @ w_near.T

        def log_q(pre: torch.Tensor) -> torch.Tensor:  # −||D(·) − F/1000||² from the first layer's pre-activation
            return -(rest(pre + first.bias) - target).pow(2).sum(-1)  # (B, T, N, S)

        informed = log_q(a_z + b_z + c_z)  # q(F | z_i, z_far, z_near)
        chance = (log_q(a_z + b_e1 + c_e) + log_q(a_e + b_z + c_e) + log_q(a_e + b_e2 + c_z)) / 3
        ir = informed - chance
        real = (filled > 0)[:, :, None, None].expand_as(ir)  # (B, T, N, S)
        out = torch.zeros(b, t, n)
        for i in range(n):  # per agent, as the official loop: its own normalizer, max and range
            mask = real[:, :, i]
            if not mask.any():
                continue
            mean_log_q = informed[:, :, i][mask].mean().abs().item()
            self.normalizer_max = max(self.normalizer_max, mean_log_q)
            scale = mean_log_q / self.normalizer_max if self.normalizer_max > 0 else 0.0
            top, bottom = ir[:, :, i][mask].max(), ir[:, :, i][mask].min()
            out[:, :, i] = ((ir[:, :, i] - top) / (top - bottom + 1e-6) * scale).mean(-1)
        return out * (filled > 0)[..., None]
