"""Collect episodes from several environments in lockstep (one batched agent forward per step, one process).

A subprocess-per-environment runner gains nothing on 2 cores; stepping E environments in one process and
batching the agent network over them does. Finished environments wait for the others. Hooks for methods:

- ``action_hook(t, actions, q, avail, active) -> actions``: change the joint actions before they are executed
  (attacks replace some agents' actions; behaviour policies pick other sub-values). ``actions`` (E, N),
  ``q`` (E, N, A), ``avail`` (E, N, A), ``active`` (E,) bool. ``runner.current`` holds the step's ``obs``,
  ``state``, ``last_actions``, the controller's hidden state before (``hidden_prev``) and after (``hidden``)
  the step and ``epsilon``; ``runner.test`` says whether the episode is a greedy test episode.
- ``store_intended``: record the actions the agents chose (before the hook) rather than the executed ones (an
  attack is then part of the environment's dynamics, as WALL trains); the agents' last-action inputs follow
  what is recorded.
- ``step_fields``: extra per-step fields the hook fills through ``record`` ({name: shape}).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from leantrain.marl.controller import MultiAgentController, epsilon_greedy
from leantrain.marl.env import MultiAgentEnv
from leantrain.marl.episodes import EpisodeBatch, EpisodeRecorder

ActionHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor]


@dataclass
class RunStats:
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    steps: int = 0


class EpisodeRunner:
    def __init__(self, envs: list[MultiAgentEnv], mac: MultiAgentController, seed: int = 0):
        if not envs:
            raise ValueError("EpisodeRunner needs at least one environment")
        self.envs, self.mac = envs, mac
        self.info = envs[0].info
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.episodes = 0  # episodes started (seeds the environments' resets)
        self.action_hook: ActionHook | None = None
        self.step_fields: dict[str, tuple[int, ...]] = {}
        self.pending: dict[str, np.ndarray] = {}  # what the hook recorded for the current step, per env
        self.store_intended = False

    def record(self, name: str, values: np.ndarray) -> None:
        """Called by an action hook: ``values`` (E, *shape) for the step being taken."""
        self.pending[name] = values

    @torch.no_grad()
    def run(self, epsilon: float, test: bool = False) -> tuple[EpisodeBatch, RunStats]:
        """One episode in every environment; returns them as a batch (E episodes) and their statistics."""
        n_env, info = len(self.envs), self.info
        self.test = test
        recorders = [EpisodeRecorder(info, self.step_fields) for _ in range(n_env)]
        current = []
        for i, env in enumerate(self.envs):
            o = env.reset(seed=self.seed * 1_000_003 + self.episodes + i)
            recorders[i].add_observation(o.obs, o.state, o.avail)
            current.append(o)
        self.episodes += n_env
        active = np.ones(n_env, bool)
        returns, lengths = np.zeros(n_env), np.zeros(n_env, int)
        h = self.mac.init_hidden(n_env)
        last = None
        t = 0
        while active.any():
            obs = torch.as_tensor(np.stack([c.obs for c in current]))
            avail = torch.as_tensor(np.stack([c.avail for c in current]))
            h_prev = h
            q, h = self.mac.step(obs, last, h)
            actions = epsilon_greedy(q, avail, 0.0 if test else epsilon, self.rng)
            self.pending = {}
            # what a hook may read: this step's inputs, the controller's hidden states, the exploration rate
            self.current = {"obs": obs, "state": torch.as_tensor(np.stack([c.state for c in current])),
                            "last_actions": last, "hidden_prev": h_prev, "hidden": h,
                            "epsilon": 0.0 if test else epsilon}  # fmt: skip
            executed = actions
            if self.action_hook is not None:
                executed = self.action_hook(t, actions, q, avail, active.copy())
            recorded = actions if self.store_intended else executed
            for i in np.flatnonzero(active):
                s = self.envs[i].step(executed[i].numpy())
                extra = {k: self.pending[k][i] for k in self.step_fields}
                recorders[i].add_step(recorded[i].numpy(), s.reward, s.terminated, **extra)
                o = s.observation
                recorders[i].add_observation(o.obs, o.state, o.avail)
                current[i] = o
                returns[i] += s.reward
                lengths[i] += 1
                if s.terminated or s.truncated or lengths[i] >= info.episode_limit:
                    active[i] = False
            last = recorded
            t += 1
        episodes = [r.episode() for r in recorders]
        batch = EpisodeBatch({k: torch.cat([e[k] for e in episodes]) for k in episodes[0].data})
        return batch, RunStats(returns.tolist(), lengths.tolist(), int(lengths.sum()))

    def test_return(self, episodes: int) -> float:
        """Mean return of ``episodes`` greedy test episodes (whole runner batches, the surplus dropped)."""
        returns: list[float] = []
        while len(returns) < episodes:
            returns += self.run(0.0, test=True)[1].returns
        return statistics.fmean(returns[:episodes])
