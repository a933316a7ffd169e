"""IBAL, Interaction-Breaking Adversarial Learning (Lee, Kang, Jo, Han, "Interaction-Breaking Adversarial Learning
Framework for Robust Multi-Agent Reinforcement Learning", ICML 2026, arXiv 2605.18024): train the team under an
attacker that severs the links between groups of agents, so it keeps working when coordination breaks.

The attacker is :class:`~leantrain.marl.ibal_attack.InteractionBreakingAttack` (cross-group observation masking and
action perturbation, greedy against the current Q, budgeted per episode). The defender is the value-decomposition
learner of the core (QMIX / VDN, ``marl.mixer``) trained on a mix of clean and attacked episodes:

- ``attacked_episodes`` (0.5) of the training episodes are collected under the attacker, the rest clean
  (interpretation: the spec names "attack probability" as a knob, the paper's mix is unknown). Like WALL the
  replay keeps the agents' *intended* actions while the environment executed the perturbed ones, and the agents'
  inputs are the observations they actually saw (masked on attacked steps); the environment's own observations
  stay in the batch as ``env_obs``. So the TD loss and its targets (online and target networks) read the attacked
  transitions.
- A consistency regularizer (``consistency`` 0.1, interpretation of the spec's "a regularizer that keeps individual
  utilities informative when cross-group information is missing"): on every (episode, step, agent) whose observation
  was masked, the mean squared difference over available actions between Q^i from the attacked inputs and Q^i
  from the environment's observations (the same network, no gradient through the clean side).
- ``clean_steps`` of ordinary training first (or ``marl.pretrained_policy``); after them the episodes are collected
  with ``collect_epsilon`` (0.0: greedy, as WALL's attacked collection, so the two compare like for like; ``None``
  keeps the epsilon schedule). Every test also runs greedy episodes under the attack with the test budget
  (``ibal_return_mean``).

Departures: no learned MI estimator and no learned attacker (the spec allows "greedy against the current Q"); the
interaction is the policy-influence KL of :func:`~leantrain.marl.ibal_attack.interaction_matrix`; the mixing and
regularizer weights are ours, the paper's are not known.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from leantrain.errors import ConfigError
from leantrain.marl.controller import MultiAgentController
from leantrain.marl.episodes import EpisodeBatch
from leantrain.marl.ibal_attack import IBALAttackConfig, InteractionBreakingAttack
from leantrain.marl.learner import LearnerConfig, QLearner


@dataclass
class IBALConfig:
    attacked_episodes: float = 0.5  # share of training episodes collected under the attacker (the rest clean)
    consistency: float = 0.1  # weight of the masked-vs-clean utility consistency loss (0: TD loss only)
    clean_steps: int = 0  # environment steps of ordinary training before the attacker switches on
    collect_epsilon: float | None = 0.0  # exploration once attacked training starts (None: the schedule's)
    attack: IBALAttackConfig = field(default_factory=IBALAttackConfig)

    def __post_init__(self):
        if not 0.0 <= self.attacked_episodes <= 1.0:
            raise ConfigError(f"ibal attacked_episodes={self.attacked_episodes} must be in [0, 1]")
        if self.consistency < 0 or self.clean_steps < 0:
            raise ConfigError(f"ibal consistency={self.consistency} and clean_steps={self.clean_steps} must be >= 0")
        if self.collect_epsilon is not None and not 0.0 <= self.collect_epsilon <= 1.0:
            raise ConfigError(f"ibal collect_epsilon={self.collect_epsilon} must be in [0, 1] or null")

    @classmethod
    def from_options(cls, options: dict) -> IBALConfig:
        """From ``marl.method_options``: one flat dict of this config's and the attack's fields."""
        own = {f.name for f in dataclasses.fields(cls)} - {"attack"}
        attack_fields = {f.name for f in dataclasses.fields(IBALAttackConfig)}
        unknown = sorted(set(options) - own - attack_fields)
        if unknown:
            raise ConfigError(
                f"marl.method_options for ibal: unknown {unknown}; choose from {sorted(own | attack_fields)}"
            )
        attack = IBALAttackConfig(**{k: v for k, v in options.items() if k in attack_fields})
        return cls(**{k: v for k, v in options.items() if k in own}, attack=attack)


class IBALLearner(QLearner):
    def __init__(self, mac: MultiAgentController, config: LearnerConfig, ibal: IBALConfig | None = None,
                 seed: int = 0):  # fmt: skip
        super().__init__(mac, config)
        self.ibal = ibal or IBALConfig()
        self.seed = seed
        self.attack_hook: InteractionBreakingAttack | None = None  # the training runner's attacker (set by attach)

    def attach(self, runner) -> InteractionBreakingAttack:
        """Install the attacker on the training runner (off until ``clean_steps``)."""
        self.attack_hook = InteractionBreakingAttack(runner, self.mac, self.ibal.attack, seed=self.seed,
                                                     episode_share=self.ibal.attacked_episodes)  # fmt: skip
        return self.attack_hook

    def collection_epsilon(self, t_env: int, epsilon: float) -> float:
        if self.attack_hook is None:
            return epsilon
        self.attack_hook.enabled = t_env >= self.ibal.clean_steps
        if self.attack_hook.enabled and self.ibal.collect_epsilon is not None:
            return self.ibal.collect_epsilon
        return epsilon

    def evaluation_runners(self, make_runner) -> dict:
        runner = make_runner(20_011)
        InteractionBreakingAttack(runner, self.mac, self.ibal.attack, seed=self.seed + 1)
        return {"ibal": runner}

    def extra_losses(self, batch: EpisodeBatch, context: dict) -> dict[str, torch.Tensor]:
        """The consistency loss on masked observations (none when nothing was masked or the weight is 0)."""
        if self.ibal.consistency == 0 or "env_obs" not in batch.data or "step_masked" not in batch.data:
            return {}
        masked = batch["step_masked"] * batch["filled"][..., None]  # (B, T, N)
        with torch.no_grad():
            clean_q = self.mac.unroll(batch["env_obs"], batch["actions"])[:, :-1]  # (B, T, N, A)
        avail = batch["avail"][:, :-1].float()
        gap = ((context["q"][:, :-1] - clean_q).pow(2) * avail).sum(-1) / avail.sum(-1).clamp_min(1)  # (B, T, N)
        loss = (gap * masked).sum() / masked.sum().clamp_min(1)
        return {"loss_consistency": self.ibal.consistency * loss}
