"""Q-learning of a value decomposition (VDN / QMIX) over episode batches, with the hooks later methods use.

The loss of one update: Q_tot(s_t, a_t) of the taken actions against a target — one-step or TD(λ) — computed with
the target networks, double-Q (the online networks pick the next actions, the target networks value them),
masked mean squared error over real steps, gradient-norm clip 10, a hard target update every
``target_update_episodes`` episodes. Methods subclass :class:`QLearner` and override

- ``intrinsic_reward(batch) -> (B, T)`` added to the environment reward (exploration bonuses); every learner's
  targets read the reward through :meth:`QLearner.rewards`, so a bonus reaches S2Q's targets as well,
- ``extra_losses(batch, context) -> {name: loss}`` added to the TD loss (auxiliary objectives),
- ``collection_epsilon(t_env, epsilon)``: the exploration of the next training batch (WALL switches its attack on
  here and collects greedily), ``evaluation_runners(make_runner)``: extra test conditions (WALL's attacked
  tests), ``test_stats(runner)``: extra fields of a test record (S2Q's sub-values' greedy joint actions),

or replace :meth:`td_loss` entirely (S2Q's several sub-values); the runner and replay stay untouched.

:class:`Learner` is what the run loop asks of every learner, value-based or not (MAPPO subclasses it directly): the
hooks above, ``train(batch, episodes) -> stats``, ``on_policy`` (train on the episodes just collected, once, instead
of samples of a replay) and saving/restoring (:meth:`Learner.networks`, :meth:`Learner.optimizers`,
:meth:`Learner.policy_parts`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from leantrain.marl.controller import MultiAgentController, greedy
from leantrain.marl.episodes import EpisodeBatch
from leantrain.marl.networks import make_mixer
from leantrain.marl.targets import td_lambda_targets


@dataclass
class LearnerConfig:
    mixer: str = "qmix"
    gamma: float = 0.99
    td_lambda: float = 0.0  # 0: one-step targets
    lr: float = 5e-4
    optimizer: str = "rmsprop"  # PyMARL: RMSprop(alpha 0.99, eps 1e-5); pymarl2: adam
    grad_clip: float = 10.0
    double_q: bool = True
    target_update_episodes: int = 200


class Learner:
    """What the run loop asks of a learner: collection and test hooks, one update, saving and restoring."""

    on_policy = False  # True: each update gets the episodes collected since the last one, then they are dropped
    mac: MultiAgentController  # the agents' controller the runners act with
    config: LearnerConfig
    updates: int

    def make_optimizer(self, params, lr: float | None = None) -> torch.optim.Optimizer:
        """``config.optimizer`` over ``params`` at ``lr`` (default ``config.lr``)."""
        c = self.config
        lr = c.lr if lr is None else lr
        if c.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr)
        return torch.optim.RMSprop(params, lr=lr, alpha=0.99, eps=1e-5)

    # ------------------------------------------------------------ hooks

    def collection_epsilon(self, t_env: int, epsilon: float) -> float:
        """Exploration of the training episodes collected at ``t_env`` (the schedule's ``epsilon`` by default)."""
        return epsilon

    def evaluation_runners(self, make_runner) -> dict:
        """Extra test conditions: {name: runner} built with ``make_runner(seed_offset)``; tests report each one's
        greedy return as ``<name>_return_mean``."""
        return {}

    def test_stats(self, runner) -> dict:
        """Extra fields of a test record."""
        return {}

    def train(self, batch: EpisodeBatch, episodes: int) -> dict[str, float]:
        """One update on ``batch``; ``episodes`` (collected so far) for schedules. Returns the stats to log."""
        raise NotImplementedError

    # ------------------------------------------------------------ saving and restoring

    def networks(self) -> dict[str, nn.Module]:
        """Every network of the learner (the keys of :meth:`state_dict` and model.safetensors)."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def policy_parts(self) -> dict[str, nn.Module]:
        """The networks a saved policy restores (names as in :meth:`state_dict`)."""
        raise NotImplementedError

    def training_state(self) -> dict:
        """What an exact resume needs: networks, optimizer states, the update counter."""
        return {"networks": self.state_dict(), "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
                "updates": self.updates}  # fmt: skip

    def load_training_state(self, state: dict) -> None:
        for name, net in self.networks().items():
            net.load_state_dict(state["networks"][name])
        for name, opt in self.optimizers().items():
            opt.load_state_dict(state["optimizers"][name])
        self.updates = state["updates"]

    def load_policy(self, path) -> None:
        """Start from a saved policy (a run's ``model.safetensors``): the networks of :meth:`policy_parts`."""
        from safetensors.torch import load_file

        from leantrain.errors import ConfigError

        tensors = load_file(str(path))
        for name, net in self.policy_parts().items():
            part = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name}
            try:
                net.load_state_dict(part)
            except RuntimeError as err:
                raise ConfigError(f"{path} does not fit this environment and learner: {err}") from None

    def state_dict(self) -> dict:
        return {name: net.state_dict() for name, net in self.networks().items()}


class QLearner(Learner):
    def __init__(self, mac: MultiAgentController, config: LearnerConfig):
        self.mac, self.config = mac, config
        info = mac.info
        self.mixer = make_mixer(config.mixer, info.n_agents, info.state_dim)
        self.target_mac, self.target_mixer = copy.deepcopy(mac), copy.deepcopy(self.mixer)
        self.params = list(mac.parameters()) + list(self.mixer.parameters())
        self.optimizer = self.make_optimizer(self.params)
        self.last_target_update = 0
        self.updates = 0

    # ------------------------------------------------------------ hooks

    def intrinsic_reward(self, batch: EpisodeBatch) -> torch.Tensor | None:
        return None

    def extra_losses(self, batch: EpisodeBatch, context: dict) -> dict[str, torch.Tensor]:
        return {}

    def rewards(self, batch: EpisodeBatch) -> torch.Tensor:
        """The reward every target is built from: the environment's plus :meth:`intrinsic_reward` (B, T)."""
        bonus = self.intrinsic_reward(batch)
        return batch["reward"] if bonus is None else batch["reward"] + bonus

    # ------------------------------------------------------------ the update

    def targets(self, batch: EpisodeBatch, q: torch.Tensor, target_qtot_next: torch.Tensor) -> torch.Tensor:
        c = self.config
        return td_lambda_targets(self.rewards(batch), batch["terminated"], batch["filled"], target_qtot_next, c.gamma,
                                 c.td_lambda)  # fmt: skip

    def td_loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, dict]:
        """Masked MSE of Q_tot(s, a) against the (TD(λ)) target; returns (loss, context for extra losses)."""
        actions, avail, filled = batch["actions"], batch["avail"], batch["filled"]
        q = self.mac.unroll(batch["obs"], actions)  # (B, T+1, N, A)
        chosen = q[:, :-1].gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (B, T, N)
        with torch.no_grad():
            target_q = self.target_mac.unroll(batch["obs"], actions)  # (B, T+1, N, A)
            pick = greedy(q.detach() if self.config.double_q else target_q, avail)  # (B, T+1, N)
            target_chosen = target_q.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
            target_qtot = self.target_mixer(target_chosen, batch["state"])  # (B, T+1)
            y = self.targets(batch, q, target_qtot)
        qtot = self.mixer(chosen, batch["state"][:, :-1])  # (B, T)
        err = (qtot - y) * filled
        loss = err.pow(2).sum() / filled.sum()
        return loss, {"q": q, "chosen": chosen, "qtot": qtot, "targets": y}

    def train(self, batch: EpisodeBatch, episodes: int) -> dict[str, float]:
        """One gradient step on ``batch``; ``episodes`` (collected so far) drives the target updates."""
        batch = batch.trimmed()
        loss, context = self.td_loss(batch)
        extras = self.extra_losses(batch, context)
        total = loss + sum(extras.values()) if extras else loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.updates += 1
        if episodes - self.last_target_update >= self.config.target_update_episodes:
            self.update_targets()
            self.last_target_update = episodes
        stats = {"loss": loss.item(), "grad_norm": float(grad_norm)}
        stats.update({f"loss_{k}": float(v) for k, v in context.get("losses", {}).items()})
        stats.update({k: v.item() for k, v in extras.items()})
        return stats

    def update_targets(self) -> None:
        self.target_mac.load_state_dict(self.mac.state_dict())
        self.target_mixer.load_state_dict(self.mixer.state_dict())

    # ------------------------------------------------------------ saving and restoring

    def networks(self) -> dict[str, nn.Module]:
        """Every network of the learner, targets included (the keys of :meth:`state_dict` and model.safetensors)."""
        return {"mac": self.mac, "mixer": self.mixer, "target_mac": self.target_mac, "target_mixer": self.target_mixer}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"learner": self.optimizer}

    def training_state(self) -> dict:
        return {**super().training_state(), "last_target_update": self.last_target_update}

    def load_training_state(self, state: dict) -> None:
        super().load_training_state(state)
        self.last_target_update = state["last_target_update"]

    def load_policy(self, path) -> None:
        """Start from a saved policy (a run's ``model.safetensors``): agent network and mixer, targets included."""
        super().load_policy(path)
        self.update_targets()

    def policy_parts(self) -> dict[str, nn.Module]:
        return {"mac": self.mac, "mixer": self.mixer}
