"""FIM, the Focusing Influence Mechanism ("Center of Gravity-Guided Focusing Influence Mechanism for Multi-Agent
Reinforcement Learning", Yisak Park, Sunwoo Lee, Seungyul Han, arXiv 2506.19417 v1; v2 is titled "Focusing Influence
Mechanism for Multi-Agent Reinforcement Learning"), on QMIX.

Under sparse rewards agents explore diffusely and do not concentrate on the few state variables whose change
unlocks the reward. FIM (i) picks a *focus set* C of global-state dimensions — v1: Center of Gravity dimensions,
stable under the agents' behaviour; v2: under-explored ones by an entropy criterion
(:mod:`leantrain.marl.fim_focus`) —, (ii) measures each agent's counterfactual influence on those dimensions with a
learned forward model, and (iii) accumulates it in eligibility traces so that persistent, synchronized influence is
rewarded (:mod:`leantrain.marl.fim_influence`). One update (:class:`FimLearner`):

    every M updates:  C = the k lowest-score varying dimensions over the replay's states
    forward model:    one Adam step on masked MSE(g(s_t, a_t), s_{t+1} − s_t) over the batch
    bonus:            r^int_t = beta · Σ_{d∈C} min_i e^i_{t,d} / running std,  e^i_{t,d} = λ_e e^i_{t−1,d} + I^i_{t,d}
    QMIX:             y = r + r^int + γ Q_tot^target(s', argmax Q(s'))  (the core's targets, double Q, TD(λ) or not)

There is no official code and only the abstracts could be read, so the formulas are interpretations of the
abstracts (and of the project spec's reference interpretation), not the paper's:

- Selection (both versions, ``criterion``): ``"cog"`` (v1, default) scores a dimension by the mean square of its
  per-step change (the spec's reference reads the variance; a constant drift would have zero variance),
  ``"entropy"`` (v2) by the entropy of a 20-bin histogram of its values; both take the k lowest
  among dimensions that vary at all (k = ``focus_size`` or ``focus_fraction`` (10 %) of the state, at least 1),
  recomputed every ``recompute_every`` (50) updates, not every step, so that the bonus stays stationary in between.
- Statistics: ``statistics="replay"`` (default) is exact over every state in the replay (a mirror filled by a
  runner step hook, :class:`~leantrain.marl.fim_focus.ReplayStates`; without a runner attached, the sampled batch);
  ``"running"`` uses moving averages over sampled batches (measured against the exact form in the tests and
  ``docs/fim.md``).
- Influence: the absolute change of g's prediction on d when agent i's action is replaced by the mean over its
  available actions (others' actions held) — an EITI/EDTI-style counterfactual; the paper may use another.
- ``focus_dims`` (ours): a fixed focus set instead of the selection, for ablations (is the selection or the bonus
  at fault?) or when the task's critical variables are known.
- Synchrony: F = min over agents (``synchrony``: ``"mean"``, ``"geometric"``), summed over C, a team reward.
- Scale: beta 0.05, divided by the running std of the raw bonus (decay 0.99); λ_e 0.9; forward model 2 × 128 ReLU,
  Adam 1e-3, one step per learner update — the spec's suggested defaults, not the paper's (unknown).
- ``center`` (ours, off by default): the running mean of the raw bonus is subtracted before scaling, so that the
  average step earns nothing and only above-average influence is paid. A bonus that is positive on every step pays
  the team for every step it stays, and on a task whose reward ends the episode it can outweigh that reward.
- ``terminal_tail`` (ours, off by default): the traces keep paying after an influential step, about
  1 / (1 − λ_e) times its influence in all, but only while the episode lasts; a goal that ends the episode forfeits
  the rest, which pays the team for delaying it. With this option a terminated step (not a truncated one, which
  bootstraps) also pays the rest of the tail, Σ_{k>=1} (γλ_e)^k F(e_t) = F(e_t) γλ_e / (1 − γλ_e), so ending the
  episode costs no bonus (docs/fim.md measures it).
- The bonus is computed with the current forward model at every update, for the sampled batch (not stored at
  collection), like FoX's formation reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.marl.controller import MultiAgentController
from leantrain.marl.episodes import EpisodeBatch
from leantrain.marl.fim_focus import CRITERIA, ReplayStates, RunningDimensionStats, exact_scores, select_focus
from leantrain.marl.fim_influence import (
    SYNCHRONY,
    ForwardModel,
    RunningScale,
    counterfactual_influence,
    eligibility_traces,
    synchronized_focus,
)
from leantrain.marl.learner import LearnerConfig, QLearner


@dataclass
class FimConfig:
    criterion: str = "cog"  # "cog" (v1: lowest mean squared per-step change) | "entropy" (v2: lowest entropy)
    focus_fraction: float = 0.1  # |C| as a fraction of the state dimensions (at least 1)
    focus_size: int = 0  # |C| directly (0: from focus_fraction)
    focus_dims: tuple[int, ...] = ()  # a fixed C (state indices), no selection: an ablation or prior knowledge
    recompute_every: int = 50  # learner updates between recomputations of C (M)
    statistics: str = "replay"  # "replay": exact over the replay's states | "running": moving averages of batches
    running_decay: float = 0.99  # decay of the running statistics
    bins: int = 20  # histogram bins of the entropy criterion
    trace_decay: float = 0.9  # eligibility-trace decay λ_e
    beta: float = 0.05  # weight of the influence bonus
    synchrony: str = "min"  # F over agents: "min" | "mean" | "geometric"
    normalize: bool = True  # divide the raw bonus by its running std
    center: bool = False  # ours, not the paper's: subtract the raw bonus's running mean (see docs/fim.md)
    terminal_tail: bool = False  # ours: a terminal step also pays the traces' discounted remaining tail
    normalizer_decay: float = 0.99
    model_hidden: int = 128  # forward model width (2 hidden layers)
    model_lr: float = 1e-3
    model_updates: int = 1  # forward-model steps per learner update

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ConfigError(f"FIM criterion={self.criterion!r} must be one of {', '.join(CRITERIA)}")
        if self.statistics not in ("replay", "running"):
            raise ConfigError(f"FIM statistics={self.statistics!r} must be 'replay' or 'running'")
        if self.synchrony not in SYNCHRONY:
            raise ConfigError(f"FIM synchrony={self.synchrony!r} must be one of {', '.join(SYNCHRONY)}")
        if not 0 < self.focus_fraction <= 1:
            raise ConfigError(f"FIM focus_fraction={self.focus_fraction!r} must be in (0, 1]")
        for name in ("trace_decay", "running_decay", "normalizer_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"FIM {name}={getattr(self, name)!r} must be in [0, 1)")
        for name, low in (("focus_size", 0), ("recompute_every", 1), ("bins", 2), ("model_hidden", 1),
                          ("model_updates", 0)):  # fmt: skip
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ConfigError(f"FIM {name}={getattr(self, name)!r} must be an integer >= {low}")
        self.focus_dims = tuple(self.focus_dims)
        if not all(isinstance(d, int) and d >= 0 for d in self.focus_dims):
            raise ConfigError(f"FIM focus_dims={list(self.focus_dims)!r} must be state indices (integers >= 0)")
        if self.beta < 0 or not self.model_lr > 0:
            raise ConfigError(f"FIM needs beta >= 0 (got {self.beta!r}) and model_lr > 0 (got {self.model_lr!r})")


class FimLearner(QLearner):
    """QMIX with FIM's influence bonus (see the module docstring). Call :meth:`attach` on the training runner so
    that the focus statistics see the replay's states; ``replay_episodes`` is the replay's capacity."""

    def __init__(self, mac: MultiAgentController, config: LearnerConfig, fim: FimConfig | None = None,
                 replay_episodes: int = 5000):  # fmt: skip
        super().__init__(mac, config)
        self.fim = f = fim or FimConfig()
        info = mac.info
        self.model = ForwardModel(info.state_dim, info.n_agents, info.n_actions, f.model_hidden)
        self.model_optimizer = torch.optim.Adam(self.model.parameters(), lr=f.model_lr)
        self.replay_states = ReplayStates(replay_episodes, info.episode_limit, info.state_dim)
        self.running = RunningDimensionStats(info.state_dim, f.bins, f.running_decay)
        self.scale = RunningScale(f.normalizer_decay)
        self.focus_size = f.focus_size or max(1, round(f.focus_fraction * info.state_dim))
        if any(d >= info.state_dim for d in f.focus_dims):
            raise ConfigError(f"FIM focus_dims={list(f.focus_dims)} must be below the state size {info.state_dim}")
        self.focus = torch.zeros(0, dtype=torch.long)
        self.focus_history: list[list[int]] = []  # every recomputation's focus set
        self.last_bonus: dict[str, float] = {}

    def attach(self, runner) -> ReplayStates:
        """Mirror the states of ``runner``'s training episodes (the replay's contents)."""
        self.replay_states.attach(runner)
        return self.replay_states

    # ------------------------------------------------------------ focus set

    def dimension_scores(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, varying) of every state dimension from the configured statistics."""
        f = self.fim
        if f.statistics == "running":
            return self.running.scores(f.criterion)
        if len(self.replay_states):
            states, filled = self.replay_states.contents()
            return exact_scores(states, filled, f.criterion, f.bins)
        return exact_scores(batch["state"], batch["filled"], f.criterion, f.bins)

    def refresh_focus(self, batch: EpisodeBatch) -> torch.Tensor:
        if self.fim.focus_dims:
            self.focus = torch.tensor(self.fim.focus_dims, dtype=torch.long)
        else:
            self.focus = select_focus(*self.dimension_scores(batch), self.focus_size)
        self.focus_history.append(self.focus.tolist())
        return self.focus

    # ------------------------------------------------------------ the bonus

    def raw_bonus(self, batch: EpisodeBatch) -> torch.Tensor:
        """Σ_{d∈C} F_i(e^i_{t,d}) before beta and normalization, (B, T); zeros while C is empty."""
        filled = batch["filled"]
        if not len(self.focus):
            return torch.zeros_like(filled)
        influence = counterfactual_influence(self.model, batch["state"][:, :-1], batch["actions"],
                                             batch["avail"][:, :-1], self.focus)  # fmt: skip
        traces = eligibility_traces(influence, filled, self.fim.trace_decay)  # (B, T, N, C)
        raw = synchronized_focus(traces, self.fim.synchrony) * filled
        if self.fim.terminal_tail:  # without new influence F(e_{t+k}) = λ^k F(e_t): Σ_{k>=1} (γλ)^k F(e_t)
            decay = self.config.gamma * self.fim.trace_decay
            raw = raw * (1 + batch["terminated"] * decay / (1 - decay))
        return raw

    def intrinsic_reward(self, batch: EpisodeBatch) -> torch.Tensor | None:
        f, filled = self.fim, batch["filled"]
        if f.beta == 0:
            return None
        raw = self.raw_bonus(batch)
        scale = 1.0
        if f.normalize or f.center:
            self.scale.update(raw[filled > 0])
        if f.center:
            raw = (raw - self.scale.mean) * filled
        if f.normalize:
            scale = 1.0 / max(self.scale.std, 1e-8)
        bonus = f.beta * scale * raw
        self.last_bonus = {"fim_bonus": float(bonus.sum() / filled.sum().clamp_min(1)), "fim_raw_std": self.scale.std}
        return bonus

    # ------------------------------------------------------------ the update

    def fit_model(self, batch: EpisodeBatch) -> float:
        loss = torch.zeros(())
        for _ in range(self.fim.model_updates):
            loss = self.model.loss(batch["state"], batch["actions"], batch["filled"])
            self.model_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.model_optimizer.step()
        return loss.item()

    def train(self, batch: EpisodeBatch, episodes: int) -> dict[str, float]:
        """Statistics and (every M updates) the focus set, a forward-model step, then QMIX's update with the bonus."""
        batch = batch.trimmed()
        self.replay_states.flush()  # the runner batch just collected is in the replay now
        if self.fim.statistics == "running":
            self.running.update(batch["state"], batch["filled"])
        if self.updates % self.fim.recompute_every == 0:
            self.refresh_focus(batch)
        model_loss = self.fit_model(batch)
        stats = super().train(batch, episodes)
        stats.update(self.last_bonus)
        stats.update({"fim_model_loss": model_loss, "focus_size": len(self.focus)})
        return stats

    def test_stats(self, runner) -> dict:
        return {"focus": self.focus.tolist()}

    # ------------------------------------------------------------ saving and restoring

    def networks(self) -> dict[str, nn.Module]:
        return {**super().networks(), "fim_model": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {**super().optimizers(), "fim_model": self.model_optimizer}

    def training_state(self) -> dict:
        return {**super().training_state(), "fim_replay_states": self.replay_states.state(),
                "fim_running": self.running.state(), "fim_scale": self.scale.state(), "fim_focus": self.focus.clone(),
                "fim_focus_history": self.focus_history}  # fmt: skip

    def load_training_state(self, state: dict) -> None:
        super().load_training_state(state)
        self.replay_states.load_state(state["fim_replay_states"])
        self.running.load_state(state["fim_running"])
        self.scale.load_state(state["fim_scale"])
        self.focus, self.focus_history = state["fim_focus"].long(), [list(x) for x in state["fim_focus_history"]]
