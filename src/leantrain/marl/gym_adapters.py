"""Adapters from PyPI multi-agent environments to :class:`~leantrain.marl.env.MultiAgentEnv` (extras ``[marl]``).

- ``lbforaging`` (Level-Based Foraging 2.0, gymnasium ids such as ``Foraging-8x8-2p-2f-coop-v3``): per-agent
  vector observations; the state is their concatenation; the mask is each player's valid moves; the team reward
  is the sum of the players' rewards. LBF reports its step limit as ``terminated``; we report it as
  ``truncated`` (the episode was cut, not finished), so value targets bootstrap there; only collecting every
  food terminates. LBF observations are raw grid coordinates and levels (up to the field size); they are divided
  by the field size (``scale_obs``, default on): QMIX's state hypernetworks on the raw values diverged here
  (Q_tot grew from 14 to 40 within 1000 updates while returns are at most 1; with scaled inputs it stays below
  1). ``scale_obs=False`` keeps the raw values.
- ``rware`` (Robotic Warehouse 2.0, ids such as ``rware-tiny-2ag-v2``): same shape, every action available;
  it never terminates, its step limit is a truncation.
- ``mpe2`` ``simple_spread_v3`` (discrete actions, N = 3 by default): PettingZoo parallel API; the state is
  the environment's global state; the team reward is the (shared) mean of the agents' rewards.
- ``mpe2`` ``simple_tag_v3`` as predator-prey (:class:`PredatorPrey`, WALL's PP family): ``n_predators`` (4)
  learning predators, ``n_prey`` (1) scripted prey (``prey="flee"``: each step the prey takes the move that
  points most directly away from its nearest predator, turned back towards the centre near the border of the
  arena; ``"random"``: uniform moves), ``n_obstacles`` (2), ``episode_limit`` 25 steps. The team reward is the
  predators' shared reward: 10 for every predator touching a prey at that step (so catching needs the team to
  corner a prey that is faster than any predator, 1.3 against 1.0).
"""

from __future__ import annotations

import numpy as np

from leantrain.errors import ConfigError, MissingDependencyError
from leantrain.marl.env import EnvInfo, MultiAgentEnv, Observation, Step

MARL_INSTALL = 'pip install -c constraints.txt -e ".[marl]"'


class GymnasiumMultiAgent(MultiAgentEnv):
    """A gymnasium env with Tuple observation/action spaces (one entry per agent): lbforaging, rware."""

    def __init__(self, env_id: str, episode_limit: int | None = None, scale_obs: bool = True, **env_kwargs):
        """``env_kwargs`` go to ``gymnasium.make`` (the environment's own options, e.g. LBF's ``sight`` or
        ``penalty``); ``max_episode_steps`` there shortens the episodes (a time limit, also the ``episode_limit``)."""
        if "max_episode_steps" in env_kwargs:
            episode_limit = episode_limit or int(env_kwargs["max_episode_steps"])
        try:
            import gymnasium as gym

            if env_id.startswith("Foraging"):
                import lbforaging  # noqa: F401  (registers the ids)
            elif env_id.startswith("rware"):
                import rware  # noqa: F401
        except ImportError as err:
            raise MissingDependencyError(f"environment {env_id!r} (the marl extras)", MARL_INSTALL) from err
        try:
            self.env = gym.make(env_id, disable_env_checker=True, **env_kwargs)
        except TypeError as err:
            raise ConfigError(f"marl.env_args for {env_id!r}: {err}") from None
        except gym.error.Error as err:
            raise ConfigError(f"unknown environment id {env_id!r}: {err}") from None
        core = self.env.unwrapped
        n = len(self.env.action_space)
        obs_dim = int(np.prod(self.env.observation_space[0].shape))
        limit = episode_limit or getattr(core, "_max_episode_steps", None) or getattr(core, "max_steps", None) or 500
        self.is_lbf = env_id.startswith("Foraging")
        if self.is_lbf:  # enum member -> action index (Enum.value is a slow descriptor on a hot path)
            from lbforaging.foraging.environment import Action

            self.action_index = {a: a.value for a in Action}
        self.obs_scale = 1.0 / max(core.field_size) if self.is_lbf and scale_obs else 1.0
        self.info = EnvInfo(n, int(self.env.action_space[0].n), obs_dim, n * obs_dim, int(limit))
        self.steps = 0

    def _avail(self) -> np.ndarray:
        n, k = self.info.n_agents, self.info.n_actions
        if not self.is_lbf:
            return np.ones((n, k), bool)
        core = self.env.unwrapped
        mask = np.zeros((n, k), bool)
        for i, player in enumerate(core.players):
            mask[i, [self.action_index[a] for a in core._valid_actions[player]]] = True
        return mask

    def _observation(self, obs) -> Observation:
        o = np.asarray(obs, np.float32).reshape(self.info.n_agents, -1)  # (N, O)
        if self.obs_scale != 1.0:
            o *= np.float32(self.obs_scale)
        self.avail = self._avail()  # the mask of the coming step, computed once
        return Observation(o, o.reshape(-1).copy(), self.avail)

    def reset(self, seed: int | None = None) -> Observation:
        obs, _ = self.env.reset(seed=seed)
        self.steps = 0
        return self._observation(obs)

    def step(self, actions) -> Step:
        a = self.check_actions(actions, self.avail)
        obs, rewards, terminated, truncated, info = self.env.step(tuple(int(x) for x in a))
        self.steps += 1
        ended = bool(np.any(terminated)) or bool(np.any(truncated))
        # LBF ends for real when every food is collected; rware never does: its "done" is the step limit
        finished = self.is_lbf and not self.env.unwrapped.field.any()
        cut = not finished and (ended or self.steps >= self.info.episode_limit)
        return Step(self._observation(obs), float(np.sum(rewards)), bool(finished), bool(cut), info)

    def close(self) -> None:
        self.env.close()


class MpeTeam(MultiAgentEnv):
    """An mpe2 PettingZoo parallel environment whose ``agents`` learn; :meth:`_scripted` acts for the others."""

    def _setup(self, env, agents: list[str], episode_limit: int) -> None:
        self.env, self.agents = env, agents
        obs_dim = int(env.observation_space(agents[0]).shape[0])
        n_actions = int(env.action_space(agents[0]).n)
        self.info = EnvInfo(len(agents), n_actions, obs_dim, int(env.state().shape[0]), episode_limit)
        self.all_available = np.ones((len(agents), n_actions), bool)
        self.steps = 0

    def _scripted(self) -> dict[str, int]:
        return {}

    def _observation(self, obs) -> Observation:
        o = np.stack([np.asarray(obs[a], np.float32) for a in self.agents])
        return Observation(o, np.asarray(self.env.state(), np.float32), self.all_available)

    def reset(self, seed: int | None = None) -> Observation:
        obs, _ = self.env.reset(seed=seed)
        self.steps = 0
        return self._observation(obs)

    def step(self, actions) -> Step:
        a = self.check_actions(actions, self.all_available)
        joint = {name: int(x) for name, x in zip(self.agents, a, strict=True)} | self._scripted()
        obs, rewards, terms, truncs, info = self.env.step(joint)
        self.steps += 1
        reward = float(np.mean([rewards[name] for name in self.agents]))  # the learning agents' (shared) reward
        cut = self.steps >= self.info.episode_limit or all(truncs.values())
        return Step(self._observation(obs), reward, False, cut, info)

    def close(self) -> None:
        self.env.close()


class SimpleSpread(MpeTeam):
    """mpe2 ``simple_spread_v3`` with discrete actions: every agent learns."""

    def __init__(self, n_agents: int = 3, episode_limit: int = 25, local_ratio: float = 0.5):
        try:
            from mpe2 import simple_spread_v3
        except ImportError as err:
            raise MissingDependencyError("mpe2 simple_spread (the marl extras)", MARL_INSTALL) from err
        env = simple_spread_v3.parallel_env(N=n_agents, max_cycles=episode_limit, local_ratio=local_ratio,
                                            continuous_actions=False)  # fmt: skip
        env.reset(seed=0)
        self._setup(env, list(env.possible_agents), episode_limit)


# the five discrete MPE moves: no-op, -x, +x, -y, +y
MPE_MOVES = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.float64)


def flee_action(prey_pos: np.ndarray, predator_pos: np.ndarray, border: float = 0.9) -> int:
    """The MPE move that points most directly away from the nearest predator, towards the centre near the border."""
    nearest = predator_pos[np.argmin(((predator_pos - prey_pos) ** 2).sum(-1))]
    away = prey_pos - nearest
    away = away / max(np.linalg.norm(away), 1e-8)
    outside = np.abs(prey_pos) > border
    away[outside] = -np.sign(prey_pos[outside])  # the way back in wins over fleeing along that axis
    return int(np.argmax(MPE_MOVES[1:] @ away)) + 1


class PredatorPrey(MpeTeam):
    """mpe2 ``simple_tag_v3``: learning predators (the agents), scripted prey (part of the environment)."""

    def __init__(self, n_predators: int = 4, n_prey: int = 1, n_obstacles: int = 2, episode_limit: int = 25,
                 prey: str = "flee", prey_speed: float | None = None):  # fmt: skip
        """``prey_speed``: the prey's top speed and acceleration scaled to this top speed (simple_tag: 1.3, accel 4;
        the predators: 1.0, accel 3); None keeps simple_tag's."""
        try:
            from mpe2 import simple_tag_v3
        except ImportError as err:
            raise MissingDependencyError("mpe2 simple_tag (the marl extras)", MARL_INSTALL) from err
        if prey not in ("flee", "random"):
            raise ConfigError(f"predator-prey prey={prey!r}; choose 'flee' or 'random'")
        if n_predators < 1 or n_prey < 1:
            raise ConfigError("predator-prey needs n_predators >= 1 and n_prey >= 1")
        env = simple_tag_v3.parallel_env(num_good=n_prey, num_adversaries=n_predators, num_obstacles=n_obstacles,
                                         max_cycles=episode_limit, continuous_actions=False)  # fmt: skip
        env.reset(seed=0)
        if prey_speed is not None:
            if prey_speed <= 0:
                raise ConfigError(f"predator-prey prey_speed={prey_speed} must be > 0")
            for agent in env.unwrapped.world.agents:
                if not agent.adversary:
                    agent.accel, agent.max_speed = agent.accel * prey_speed / agent.max_speed, prey_speed
        self._setup(env, [a for a in env.possible_agents if a.startswith("adversary")], episode_limit)
        self.prey = [a for a in env.possible_agents if not a.startswith("adversary")]
        self.policy, self.rng = prey, np.random.default_rng(0)

    def _scripted(self) -> dict[str, int]:
        world = self.env.unwrapped.world
        if self.policy == "random":
            return {name: int(self.rng.integers(5)) for name in self.prey}
        chasers = np.stack([a.state.p_pos for a in world.agents if a.adversary])
        return {a.name: flee_action(a.state.p_pos, chasers) for a in world.agents if not a.adversary}

    def reset(self, seed: int | None = None) -> Observation:
        self.rng = np.random.default_rng(seed)
        return super().reset(seed)
