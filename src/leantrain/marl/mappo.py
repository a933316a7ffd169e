"""MAPPO: PPO with a centralised value function for cooperative multi-agent games.

Yu, Velu, Vinitsky, Gao, Wang, Bayen, Wu 2022, "The Surprising Effectiveness of PPO in Cooperative Multi-Agent
Games" (NeurIPS Datasets and Benchmarks; arXiv 2103.01955). Decentralised policies pi_i(a | o_i history) act on
their own observations (the core's controller, its agent network output read as logits, GRU by default: the
paper's recurrent rMAPPO); a centralised critic V(s) on the global state (:mod:`leantrain.marl.policy`) gives one
team advantage per step, by GAE(lambda), shared by every agent (the reward is the team's). One update on the
episodes just collected: ``ppo_epoch`` passes, each over ``num_mini_batch`` minibatches of whole episodes, of

- the clipped surrogate  -mean min(rho A, clip(rho, 1 - eps, 1 + eps) A),  rho = pi(a|h) / pi_old(a|h),
  over every real agent-step, minus ``entropy_coef`` x the policy's entropy;
- the clipped value loss  mean max(l(V - R), l(V_old + clip(V - V_old, -eps, eps) - R)),  l = Huber(delta 10),
  on value-normalised targets R (GAE returns);

with advantages normalised over the batch, unavailable actions masked out of the softmax (probability exactly 0),
padding steps masked out of every mean (and, where a batch carries the step field ``agent_mask``, the agent-steps
it marks 0 out of the policy and entropy terms: a frozen partner's steps, :mod:`leantrain.marl.partners`),
separate optimizers for actor and critic and gradient-norm clip 10 each.
Defaults are the paper's (its MPE script): lr 7e-4 in the recipe (5e-4 elsewhere in the paper), clip 0.2,
gae_lambda 0.95, gamma 0.99, ppo_epoch 10 (5-15 in the paper), one minibatch, entropy 0.01, value loss weight 1,
Huber delta 10, grad-norm clip 10, value normalisation on, hidden 64, shared parameters with the agent's one-hot id.

Collection uses the core's :class:`~leantrain.marl.runner.EpisodeRunner` with its ``select_actions`` set to
:func:`~leantrain.marl.controller.sample_policy` (softmax sampling; test episodes are greedy, the paper's
deterministic evaluation) and the run loop's :class:`~leantrain.marl.episodes.EpisodeRollout` (``on_policy``).
The old log-probabilities and values are recomputed at the start of the update from the unchanged networks
(the same numbers the runner acted with) instead of being stored during collection.

Deliberate departures:

- Recurrent policies are unrolled over whole episodes from a zero hidden state (the official code trains on
  chunks of 10 steps from stored hidden states); minibatches are sets of episodes.
- The critic is feed-forward on the global state (the official rMAPPO critic is recurrent); the value
  normaliser is updated once per update with the batch's returns (officially once per minibatch, so
  ``ppo_epoch`` times with the same returns when there is one minibatch).
- The policy's inputs are the observation and the one-hot agent id (no last action, as the official code;
  ``last_action=True`` adds it); with ``shared=False`` every agent has its own network (the id stays in the
  input, a constant there). PyTorch's default initialisation (the official code: orthogonal, output gain 0.01),
  and Adam's default eps 1e-8 (officially 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leantrain.errors import ConfigError
from leantrain.marl.controller import MultiAgentController, masked_log_softmax, sample_policy
from leantrain.marl.episodes import EpisodeBatch
from leantrain.marl.learner import Learner, LearnerConfig
from leantrain.marl.policy import StateValue
from leantrain.marl.targets import gae_advantages

AGENT_MASK = "agent_mask"  # an optional step field (B, T, N): 1 for the agent-steps the policy learns from


@dataclass
class MappoConfig:
    ppo_epoch: int = 10  # passes over each batch (paper: 5-15; its MPE script: 10)
    num_mini_batch: int = 1  # minibatches of whole episodes per pass (paper: 1)
    clip: float = 0.2  # PPO ratio clip and value clip epsilon
    gae_lambda: float = 0.95
    entropy_coef: float = 0.01
    value_loss_coef: float = 1.0
    huber_delta: float | None = 10.0  # None: squared error (1/2 e^2)
    clip_value: bool = True  # the clipped value loss
    value_norm: bool = True  # running normalisation of the value targets
    advantage_norm: bool = True  # advantages to mean 0, std 1 over the batch's real steps
    shared: bool = True  # one policy network for all agents (False: one per agent)
    last_action: bool = False  # the previous action among the policy's inputs
    critic_hidden: int = 64
    critic_lr: float | None = None  # None: marl.lr

    def __post_init__(self):
        for name in ("ppo_epoch", "num_mini_batch", "critic_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"MAPPO {name}={value!r} must be an integer >= 1")
        if not 0 < self.clip < 1:
            raise ConfigError(f"MAPPO clip={self.clip!r} must be in (0, 1)")
        if not 0 <= self.gae_lambda <= 1:
            raise ConfigError(f"MAPPO gae_lambda={self.gae_lambda!r} must be in [0, 1]")
        if self.entropy_coef < 0 or not self.value_loss_coef > 0:
            raise ConfigError("MAPPO needs entropy_coef >= 0 and value_loss_coef > 0")
        if self.huber_delta is not None and not self.huber_delta > 0:
            raise ConfigError(f"MAPPO huber_delta={self.huber_delta!r} must be > 0 (or null: squared error)")
        if self.critic_lr is not None and not self.critic_lr > 0:
            raise ConfigError(f"MAPPO critic_lr={self.critic_lr!r} must be > 0 (or null: marl.lr)")
        for name in ("clip_value", "value_norm", "advantage_norm", "shared", "last_action"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"MAPPO {name}={getattr(self, name)!r} must be true or false")


def ppo_losses(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, entropy: torch.Tensor,
               values: torch.Tensor, old_values: torch.Tensor, targets: torch.Tensor, filled: torch.Tensor,
               config: MappoConfig, agent_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The three MAPPO terms, masked means over real steps.

    logp, old_logp, entropy (B, T, N): the taken actions' log-probabilities now and at collection, the policy's
    entropy; adv, values, old_values, targets, filled (B, T): team advantage, critic now and at collection, value
    targets (the critic's units), 1 for real steps; ``agent_mask`` (B, T, N), optional: the agent-steps the policy
    and entropy terms average over (default every agent). Returns policy (to minimise), entropy and value losses and
    the fraction of agent-steps whose ratio was clipped."""
    agents = filled.unsqueeze(-1).expand_as(logp)  # (B, T, N)
    if agent_mask is not None:
        agents = agents * agent_mask
    count = agents.sum().clamp(min=1)
    ratio = (logp - old_logp).exp()
    a = adv.unsqueeze(-1)  # one team advantage for every agent
    surrogate = torch.min(ratio * a, ratio.clamp(1 - config.clip, 1 + config.clip) * a)
    value_loss = _value_error(values - targets, config)
    if config.clip_value:
        clipped = old_values + (values - old_values).clamp(-config.clip, config.clip)
        value_loss = torch.max(value_loss, _value_error(clipped - targets, config))
    steps = filled.sum().clamp(min=1)
    outside = ((ratio - 1).abs() > config.clip).float()
    return {
        "policy": -(surrogate * agents).sum() / count,
        "entropy": (entropy * agents).sum() / count,
        "value": (value_loss * filled).sum() / steps,
        "clip_fraction": ((outside * agents).sum() / count).detach(),
    }


def _value_error(err: torch.Tensor, config: MappoConfig) -> torch.Tensor:
    """Huber(delta) of the error, or 1/2 err^2."""
    if config.huber_delta is None:
        return 0.5 * err.pow(2)
    return F.huber_loss(err, torch.zeros_like(err), reduction="none", delta=config.huber_delta)


def normalized_advantages(adv: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """adv (B, T) to mean 0, std 1 over the real steps; padding stays 0."""
    real = adv[filled > 0]
    std = real.std() if real.numel() > 1 else real.new_ones(())
    return (adv - real.mean()) / (std + 1e-5) * filled


def mappo_actor(info, marl, options: MappoConfig) -> MultiAgentController:
    """MAPPO's policy for an environment (``info``): the run config's ``marl`` section's agent network and width, the
    options' ``last_action`` and ``shared`` (what a run trains and what a saved policy is loaded into)."""
    return MultiAgentController(info, hidden=marl.agent_hidden, agent=marl.agent, last_action=options.last_action,
                                shared=options.shared)  # fmt: skip


class MappoLearner(Learner):
    on_policy = True

    def __init__(self, mac: MultiAgentController, config: LearnerConfig, mappo: MappoConfig | None = None,
                 seed: int = 0):  # fmt: skip
        self.mac, self.config, self.mappo = mac, config, mappo or MappoConfig()
        self.critic = StateValue(mac.info.state_dim, self.mappo.critic_hidden, self.mappo.value_norm)
        self.actor_optimizer = self.make_optimizer(mac.parameters())
        self.critic_optimizer = self.make_optimizer(self.critic.parameters(), self.mappo.critic_lr)
        self.generator = torch.Generator().manual_seed(seed)  # minibatch shuffling
        self.updates = 0

    def attach(self, runner) -> None:
        """Collect with this learner's policy, sampling from its softmax."""
        runner.mac = self.mac
        runner.select_actions = sample_policy

    def collection_epsilon(self, t_env: int, epsilon: float) -> float:
        """No epsilon: sampling from the policy is the exploration."""
        return 0.0

    # ------------------------------------------------------------ the update

    def policy_terms(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi(a_t | h_t) of the taken actions, entropy of pi(. | h_t)), both (B, T, N)."""
        logits = self.mac.unroll(batch["obs"], batch["actions"])[:, :-1]  # (B, T, N, A)
        logp = masked_log_softmax(logits, batch["avail"][:, :-1])
        taken = logp.gather(-1, batch["actions"].unsqueeze(-1)).squeeze(-1)
        return taken, -(logp.exp() * logp).sum(-1)

    @torch.no_grad()
    def rollout_targets(self, batch: EpisodeBatch) -> dict[str, torch.Tensor]:
        """What the policy and critic gave at collection (unchanged since), GAE advantages and value targets."""
        filled = batch["filled"]
        old_logp, _ = self.policy_terms(batch)
        old_values = self.critic(batch["state"])  # (B, T+1), the critic's units
        adv, returns = gae_advantages(batch["reward"], batch["terminated"], filled,
                                      self.critic.denormalize(old_values), self.config.gamma,
                                      self.mappo.gae_lambda)  # fmt: skip
        if self.critic.norm is not None:
            self.critic.norm.update(returns[filled > 0])
        if self.mappo.advantage_norm:
            adv = normalized_advantages(adv, filled)
        return {"old_logp": old_logp, "old_values": old_values[:, :-1], "adv": adv,
                "targets": self.critic.normalize(returns), "returns": returns}  # fmt: skip

    def train(self, batch: EpisodeBatch, episodes: int) -> dict[str, float]:
        """``ppo_epoch`` passes over the batch's episodes in ``num_mini_batch`` shuffled minibatches."""
        batch = batch.trimmed()
        fixed = self.rollout_targets(batch)
        c, clip = self.mappo, self.config.grad_clip
        for _ in range(c.ppo_epoch):
            for idx in torch.randperm(batch.size, generator=self.generator).chunk(c.num_mini_batch):
                part = EpisodeBatch({k: v[idx] for k, v in batch.data.items()})
                logp, entropy = self.policy_terms(part)
                values = self.critic(part["state"][:, :-1])
                losses = ppo_losses(logp, fixed["old_logp"][idx], fixed["adv"][idx], entropy, values,
                                    fixed["old_values"][idx], fixed["targets"][idx], part["filled"], c,
                                    part.data.get(f"step_{AGENT_MASK}"))  # fmt: skip
                actor_loss = losses["policy"] - c.entropy_coef * losses["entropy"]
                loss = actor_loss + c.value_loss_coef * losses["value"]
                self.actor_optimizer.zero_grad(set_to_none=True)
                self.critic_optimizer.zero_grad(set_to_none=True)
                loss.backward()  # actor and critic share no parameter: one backward serves both optimizers
                actor_norm = nn.utils.clip_grad_norm_(self.mac.parameters(), clip)
                critic_norm = nn.utils.clip_grad_norm_(self.critic.parameters(), clip)
                self.actor_optimizer.step()
                self.critic_optimizer.step()
        self.updates += 1
        real = batch["filled"] > 0
        return {"loss": loss.item(), "policy_loss": losses["policy"].item(), "value_loss": losses["value"].item(),
                "entropy": losses["entropy"].item(), "clip_fraction": losses["clip_fraction"].item(),
                "actor_grad_norm": float(actor_norm), "critic_grad_norm": float(critic_norm),
                "value_target_mean": fixed["returns"][real].mean().item()}  # fmt: skip

    # ------------------------------------------------------------ saving and restoring

    def networks(self) -> dict[str, nn.Module]:
        return {"mac": self.mac, "critic": self.critic}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor_optimizer, "critic": self.critic_optimizer}

    def policy_parts(self) -> dict[str, nn.Module]:
        return {"mac": self.mac, "critic": self.critic}

    def training_state(self) -> dict:
        return {**super().training_state(), "generator": self.generator.get_state()}

    def load_training_state(self, state: dict) -> None:
        super().load_training_state(state)
        self.generator.set_state(state["generator"])
