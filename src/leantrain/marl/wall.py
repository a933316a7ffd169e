"""WALL, Wolfpack-Adversarial Learning (Lee et al., ICML 2025): train the team under the Wolfpack attack.

Training episodes are collected with :class:`~leantrain.marl.wolfpack.WolfpackAttack` on the runner (budget 12,
the agents' own actions greedy); the replay stores the agents' *intended* actions while the environment executed
the forced ones, so the usual TD loss regresses Q(s, intended a) on rewards and next states produced by the
attacked joint action: the attack becomes part of the environment's dynamics, which is what teaches the team
system-wide compensation. Every update also trains the attack's two transformers on the same batch (the planner
keeps up with the policy it attacks). WALL starts from a clean policy: ``clean_steps`` of ordinary training in the
same run (or ``marl.pretrained_policy``), then attacked training: :meth:`WALLLearner.collection_epsilon` switches the
attack on and collects greedily (the official runner's epsilon 0), and every test also runs greedy episodes under
the attack with the test budget (:meth:`WALLLearner.evaluation_runners`, ``attacked_return_mean``).
"""

from __future__ import annotations

from leantrain.marl.controller import MultiAgentController
from leantrain.marl.episodes import EpisodeBatch
from leantrain.marl.learner import LearnerConfig, QLearner
from leantrain.marl.wolfpack import WolfpackAttack, WolfpackConfig, WolfpackPlanner


class WALLLearner(QLearner):
    def __init__(self, mac: MultiAgentController, config: LearnerConfig, attack: WolfpackConfig | None = None,
                 seed: int = 0, clean_steps: int = 0):  # fmt: skip
        super().__init__(mac, config)
        self.attack = attack or WolfpackConfig()
        self.clean_steps = clean_steps  # environment steps of ordinary training before the attack switches on
        self.planner = WolfpackPlanner(mac, self.attack, lr=config.lr, seed=seed)
        self.seed = seed
        self.attack_hook: WolfpackAttack | None = None  # the training runner's attack (set by attach)

    def attach(self, runner) -> WolfpackAttack:
        """Install the Wolfpack attack on the training runner (off until ``clean_steps``)."""
        self.attack_hook = WolfpackAttack(runner, self.mac, self.mixer, self.planner, self.attack,
                                          lr=self.config.lr, seed=self.seed)  # fmt: skip
        return self.attack_hook

    def collection_epsilon(self, t_env: int, epsilon: float) -> float:
        """Clean training (the schedule's epsilon) until ``clean_steps``, then greedy agents under the attack."""
        if self.attack_hook is None:
            return epsilon
        self.attack_hook.enabled = t_env >= self.clean_steps
        return 0.0 if self.attack_hook.enabled else epsilon

    def evaluation_runners(self, make_runner) -> dict:
        runner = make_runner(20_011)
        WolfpackAttack(runner, self.mac, self.mixer, self.planner, self.attack, lr=self.config.lr, seed=self.seed + 1)
        return {"attacked": runner}

    def train(self, batch: EpisodeBatch, episodes: int) -> dict[str, float]:
        stats = super().train(batch, episodes)
        stats.update(self.planner.fit(batch, self.mac, self.mixer))
        return stats

    def networks(self) -> dict:
        return {**super().networks(), "planner": self.planner}

    def optimizers(self) -> dict:
        return {**super().optimizers(), "world": self.planner.world_opt, "damage": self.planner.damage_opt}

    def training_state(self) -> dict:
        return {**super().training_state(), "planner_rng": self.planner.rng.bit_generator.state}

    def load_training_state(self, state: dict) -> None:
        super().load_training_state(state)
        self.planner.rng.bit_generator.state = state["planner_rng"]
