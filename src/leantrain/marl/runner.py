"""Collect episodes from several environments in lockstep (one batched agent forward per step, one process).

A subprocess-per-environment runner gains nothing on 2 cores; stepping E environments in one process and
batching the agent network over them does. Finished environments wait for the others. Per step the runner stacks
the observations and masks once, runs one agent forward for all environments and draws exploration from
generators it keeps for its lifetime. Hooks for methods (all optional):

- ``observation_hook(t, obs, state, avail, fresh) -> obs``: change what the agents observe before they see it
  (IBAL's observation masking). ``obs`` (E, N, obs_dim) numpy, ``fresh`` (E,) bool: the environments whose
  observation is new this slot (including an episode's last one). The hooked observations are what the agents
  act on and what the batch stores as ``obs``; the environment's own are kept in the slot field ``env_obs``.
- ``action_hook(t, actions, q, avail, active) -> actions``: change the joint actions before they are executed
  (attacks replace some agents' actions; behaviour policies pick other sub-values). ``actions`` (E, N),
  ``q`` (E, N, A), ``avail`` (E, N, A), ``active`` (E,) bool. ``runner.current`` holds the step's ``obs``,
  ``state``, ``last_actions``, the controller's hidden state before (``hidden_prev``) and after (``hidden``)
  the step and ``epsilon``; ``runner.test`` says whether the episode is a greedy test episode.
- ``step_hooks``: callables ``(t, transition)`` run after every step of a *training* episode (never in tests):
  ``transition`` holds numpy ``obs``, ``state``, ``actions`` (executed), ``reward`` (E,), ``next_obs``,
  ``next_state`` and ``active`` (E,: the environments that took the step) (formation counting, visitation
  statistics). They may ``record`` fields.
- ``store_intended``: record the actions the agents chose (before the hook) rather than the executed ones (an
  attack is then part of the environment's dynamics, as WALL trains); the agents' last-action inputs follow
  what is recorded.
- ``step_fields``: extra per-step fields hooks fill through ``record`` ({name: shape}); zeros where no hook
  recorded one (a step hook's field in a test episode).
- ``select_actions(q, avail, epsilon, rng, generator) -> actions``: how training episodes pick actions from the
  controller's outputs (default :func:`~leantrain.marl.controller.epsilon_greedy`; policy-gradient learners
  install :func:`~leantrain.marl.controller.sample_policy`). Test episodes are always greedy.

The episodes are written in place into arrays padded to the episode limit (:class:`BatchRecorder`): environments
stepped in lockstep reach slot t together.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from leantrain.marl.controller import MultiAgentController, epsilon_greedy, greedy
from leantrain.marl.env import MultiAgentEnv
from leantrain.marl.episodes import BatchRecorder, EpisodeBatch

ActionHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor]
ObservationHook = Callable[[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
StepHook = Callable[[int, dict], None]
# (q or logits (E, N, A), avail (E, N, A), epsilon, rng, generator) -> actions (E, N)
ActionSelector = Callable[[torch.Tensor, torch.Tensor, float, np.random.Generator, torch.Generator], torch.Tensor]


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
        self.generator = torch.Generator().manual_seed(int(self.rng.integers(2**31)))  # exploration's actions
        self.seed = seed
        self.episodes = 0  # episodes started (seeds the environments' resets)
        self.test = False
        self.action_hook: ActionHook | None = None
        self.observation_hook: ObservationHook | None = None
        self.step_hooks: list[StepHook] = []
        self.step_fields: dict[str, tuple[int, ...]] = {}
        self.pending: dict[str, np.ndarray] = {}  # what the hooks recorded for the current step, per env
        self.store_intended = False
        self.select_actions: ActionSelector = epsilon_greedy

    def record(self, name: str, values: np.ndarray) -> None:
        """Called by a hook: ``values`` (E, *shape) for the step being taken."""
        self.pending[name] = values

    @torch.no_grad()
    def run(self, epsilon: float, test: bool = False) -> tuple[EpisodeBatch, RunStats]:
        """One episode in every environment; returns them as a batch (E episodes) and their statistics."""
        n_env, info = len(self.envs), self.info
        self.test = test
        epsilon = 0.0 if test else epsilon
        hooked = self.observation_hook is not None
        slot_fields = {"env_obs": (info.n_agents, info.obs_dim)} if hooked else {}
        recorder = BatchRecorder(info, n_env, self.step_fields, slot_fields)
        current = [env.reset(seed=self.seed * 1_000_003 + self.episodes + i) for i, env in enumerate(self.envs)]
        self.episodes += n_env
        active = np.ones(n_env, bool)
        fresh = np.ones(n_env, bool)  # environments whose current observation is not recorded yet
        returns, lengths = np.zeros(n_env), np.zeros(n_env, int)
        h = self.mac.init_hidden(n_env)
        last = None
        t = 0
        while True:
            env_obs = np.stack([c.obs for c in current])
            state_np, avail_np = np.stack([c.state for c in current]), np.stack([c.avail for c in current])
            obs_np = self.observation_hook(t, env_obs, state_np, avail_np, fresh.copy()) if hooked else env_obs
            slot = {"env_obs": env_obs} if hooked else {}
            recorder.add_observations(t, np.flatnonzero(fresh), obs_np, state_np, avail_np, **slot)
            fresh[:] = False
            if not active.any():
                break
            obs, state, avail = (torch.as_tensor(x) for x in (obs_np, state_np, avail_np))
            h_prev = h
            q, h = self.mac.step(obs, last, h)
            actions = greedy(q, avail) if test else self.select_actions(q, avail, epsilon, self.rng, self.generator)
            self.pending = {}
            # what a hook may read: this step's inputs, the controller's hidden states, the exploration rate
            self.current = {"obs": obs, "state": state, "last_actions": last, "hidden_prev": h_prev, "hidden": h,
                            "epsilon": epsilon}  # fmt: skip
            executed = actions
            if self.action_hook is not None:
                executed = self.action_hook(t, actions, q, avail, active.copy())
            recorded = actions if self.store_intended else executed
            executed_np = executed.numpy()
            stepped = np.flatnonzero(active)
            rewards, terminated = np.zeros(n_env), np.zeros(n_env, bool)
            for i in stepped:
                s = self.envs[i].step(executed_np[i])
                current[i] = s.observation
                rewards[i], terminated[i] = s.reward, s.terminated
                lengths[i] += 1
                if s.terminated or s.truncated or lengths[i] >= info.episode_limit:
                    active[i] = False
            returns += rewards
            recorder.add_steps(t, stepped, recorded.numpy(), rewards, terminated)
            fresh[stepped] = True  # the environments that took this step have a new observation
            if self.step_hooks and not test:
                transition = {"obs": obs_np, "state": state_np, "actions": executed_np, "reward": rewards,
                              "next_obs": np.stack([c.obs for c in current]),
                              "next_state": np.stack([c.state for c in current]), "active": fresh.copy()}  # fmt: skip
                for hook in self.step_hooks:
                    hook(t, transition)
            if self.step_fields:
                recorder.add_extras(t, stepped, self.pending)
            last = recorded
            t += 1
        return recorder.batch(), RunStats(returns.tolist(), lengths.tolist(), int(lengths.sum()))

    def test_return(self, episodes: int) -> float:
        """Mean return of ``episodes`` greedy test episodes (whole runner batches, the surplus dropped)."""
        returns: list[float] = []
        while len(returns) < episodes:
            returns += self.run(0.0, test=True)[1].returns
        return statistics.fmean(returns[:episodes])
