"""VMAS (Bettini et al. 2022, ``vmas`` on PyPI) scenarios as a :class:`~leantrain.marl.env.MultiAgentEnv`.

``vmas:<scenario>`` builds one VMAS environment of one copy (``num_envs=1``) with discrete actions on the CPU;
``marl.env_args`` go to ``vmas.make_env`` (``max_steps``, the default episode limit 100, and the scenario's own
options such as ``n_agents``). Observations are the agents' vectors, the state their concatenation, every
action is available, the team reward is the mean of the agents' rewards, and VMAS's ``done`` is a real end
unless the step limit was reached (a truncation). VMAS is built for thousands of copies stepped as one tensor;
one copy costs about 7 ms a step here, so it suits checks and small runs, not long CPU training.
"""

from __future__ import annotations

import numpy as np

from leantrain.errors import ConfigError, MissingDependencyError
from leantrain.marl.env import EnvInfo, MultiAgentEnv, Observation, Step
from leantrain.marl.gym_adapters import MARL_INSTALL


class VmasMultiAgent(MultiAgentEnv):
    def __init__(self, scenario: str, max_steps: int = 100, **scenario_args):
        try:
            import torch
            import vmas
        except ImportError as err:
            raise MissingDependencyError("vmas (the marl extras)", MARL_INSTALL) from err
        if scenario not in vmas.scenarios:
            raise ConfigError(f"unknown vmas scenario {scenario!r}; choose from {', '.join(vmas.scenarios)}")
        self.torch = torch
        self.env = vmas.make_env(scenario, num_envs=1, device="cpu", continuous_actions=False, seed=0,
                                 max_steps=max_steps, **scenario_args)  # fmt: skip
        obs = self.env.reset()
        n = self.env.n_agents
        actions = {int(space.n) for space in self.env.action_space}
        if len(actions) != 1:
            raise ConfigError(f"vmas:{scenario}: the agents have different action counts {sorted(actions)}")
        dims = {int(o.shape[-1]) for o in obs}
        if len(dims) != 1:
            raise ConfigError(f"vmas:{scenario}: the agents' observations differ in size {sorted(dims)}")
        self.info = EnvInfo(n, actions.pop(), dims.pop(), n * int(obs[0].shape[-1]), max_steps)
        self.steps = 0

    def _observation(self, obs) -> Observation:
        o = np.stack([x[0].numpy().astype(np.float32) for x in obs])
        return Observation(o, o.reshape(-1).copy(), np.ones((self.info.n_agents, self.info.n_actions), bool))

    def reset(self, seed: int | None = None) -> Observation:
        self.steps = 0
        # runners derive reset seeds past 2**32 (seed * 1_000_003 + episode); VMAS seeds numpy, which refuses them
        return self._observation(self.env.reset(seed=None if seed is None else seed % 2**32))

    def step(self, actions) -> Step:
        a = self.check_actions(actions, np.ones((self.info.n_agents, self.info.n_actions), bool))
        obs, rewards, done, info = self.env.step([self.torch.tensor([int(x)]) for x in a])
        self.steps += 1
        reward = float(np.mean([r[0].item() for r in rewards]))
        limit = self.steps >= self.info.episode_limit
        ended = bool(done[0])
        return Step(self._observation(obs), reward, ended and not limit, limit, {})
