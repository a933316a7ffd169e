"""Episode batches and the episode replay buffer (PyMARL's data layout).

An episode of length T (≤ the environment's limit) is stored as tensors over T + 1 time slots, padded to the
limit: ``obs`` (T+1, N, obs_dim), ``state`` (T+1, state_dim), ``avail`` (T+1, N, n_actions), then per step
``actions`` (T, N), ``reward`` (T,), ``terminated`` (T,) and ``filled`` (T,) (1 for real steps, 0 for
padding). A batch stacks episodes along a leading dimension B. Extra per-step fields (``extra_fields``, stored as
``step_<name>``) and per-slot fields (``slot_fields``, stored under their name, T+1 slots) let methods record what
they need (which agents an attack controlled, the unmasked observations) without touching this module.
Off-policy learners sample from a :class:`ReplayBuffer`; on-policy ones (MAPPO) train once on every episode an
:class:`EpisodeRollout` collected.
"""

from __future__ import annotations

import numpy as np
import torch

from leantrain.errors import ConfigError
from leantrain.marl.env import EnvInfo

STEP_FIELDS = ("actions", "reward", "terminated", "filled")


class EpisodeBatch:
    """A dict of tensors with leading dims (B, T+1) for slot fields and (B, T) for step fields."""

    def __init__(self, data: dict[str, torch.Tensor]):
        self.data = data

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.data[key]

    @property
    def size(self) -> int:
        return self.data["reward"].shape[0]

    @property
    def max_t(self) -> int:
        """The longest real episode in the batch (steps)."""
        return int(self.data["filled"].sum(1).max().item())

    def trimmed(self) -> EpisodeBatch:
        """The batch cut to its longest real episode (less padding to compute on)."""
        t = self.max_t
        return EpisodeBatch({k: v[:, : t + 1] if k not in STEP_FIELDS and not k.startswith("step_") else v[:, :t]
                             for k, v in self.data.items()})  # fmt: skip


class BatchRecorder:
    """E episodes recorded in lockstep straight into arrays padded to the episode limit (the runner's path).

    Environments stepped together reach slot t together, so a step writes the rows of the environments that took
    it at index t; :meth:`batch` marks the real steps and returns the tensors without copying them again."""

    def __init__(self, info: EnvInfo, episodes: int, extra_fields: dict[str, tuple[int, ...]] | None = None,
                 slot_fields: dict[str, tuple[int, ...]] | None = None):  # fmt: skip
        n, k, limit = info.n_agents, info.n_actions, info.episode_limit
        self.info, self.extra_fields, self.slot_fields = info, extra_fields or {}, slot_fields or {}
        self.data = {
            "obs": np.zeros((episodes, limit + 1, n, info.obs_dim), np.float32),
            "state": np.zeros((episodes, limit + 1, info.state_dim), np.float32),
            "avail": np.zeros((episodes, limit + 1, n, k), np.bool_),
            "actions": np.zeros((episodes, limit, n), np.int64),
            "reward": np.zeros((episodes, limit), np.float32),
            "terminated": np.zeros((episodes, limit), np.float32),
            "filled": np.zeros((episodes, limit), np.float32),
        }
        for key, shape in self.extra_fields.items():
            self.data[f"step_{key}"] = np.zeros((episodes, limit, *shape), np.float32)
        for key, shape in self.slot_fields.items():
            self.data[key] = np.zeros((episodes, limit + 1, *shape), np.float32)
        self.observed = np.zeros(episodes, np.int64)  # observations recorded per episode
        self.steps = np.zeros(episodes, np.int64)

    def add_observations(self, t: int, rows, obs, state, avail, **slot) -> None:
        """Slot t of the episodes ``rows`` (indices): obs (E, N, O), state, avail and slot fields indexed by row."""
        d = self.data
        d["obs"][rows, t], d["state"][rows, t], d["avail"][rows, t] = obs[rows], state[rows], avail[rows]
        for key in self.slot_fields:
            d[key][rows, t] = slot[key][rows]
        self.observed[rows] = t + 1

    def add_steps(self, t: int, rows, actions, reward, terminated) -> None:
        """Step t of the episodes ``rows``: actions (E, N), reward (E,), terminated (E,) indexed by row."""
        d = self.data
        d["actions"][rows, t] = actions[rows]
        d["reward"][rows, t] = reward[rows]
        d["terminated"][rows, t] = terminated[rows]
        d["filled"][rows, t] = 1.0
        self.steps[rows] = t + 1

    def add_extras(self, t: int, rows, extra: dict[str, np.ndarray]) -> None:
        """The extra fields of step t: {name: (E, *shape)}; missing ones stay 0."""
        for key in self.extra_fields:
            if key in extra:
                self.data[f"step_{key}"][rows, t] = np.asarray(extra[key])[rows]

    def batch(self) -> EpisodeBatch:
        bad = np.flatnonzero(self.observed != self.steps + 1)
        if bad.size:
            i = int(bad[0])
            raise ConfigError(f"an episode of {self.steps[i]} steps needs {self.steps[i] + 1} observations, "
                              f"got {self.observed[i]}")  # fmt: skip
        avail = self.data["avail"]
        for i, length in enumerate(self.steps):
            avail[i, length + 1 :] = True  # padding slots: any action "available" so masked maxima stay finite
        return EpisodeBatch({k: torch.from_numpy(v) for k, v in self.data.items()})


class EpisodeRecorder:
    """Collects one episode step by step, then yields it padded to the episode limit."""

    def __init__(self, info: EnvInfo, extra_fields: dict[str, tuple[int, ...]] | None = None,
                 slot_fields: dict[str, tuple[int, ...]] | None = None):  # fmt: skip
        self.recorder = BatchRecorder(info, 1, extra_fields, slot_fields)
        self.row = np.zeros(1, np.int64)

    def add_observation(self, obs: np.ndarray, state: np.ndarray, avail: np.ndarray, **slot) -> None:
        t = int(self.recorder.observed[0])
        if t > self.recorder.info.episode_limit:
            raise ConfigError(f"an episode holds at most {t} observations (episode limit {t - 1})")
        self.recorder.add_observations(t, self.row, *(np.asarray(x)[None] for x in (obs, state, avail)),
                                       **{k: np.asarray(v)[None] for k, v in slot.items()})  # fmt: skip

    def add_step(self, actions: np.ndarray, reward: float, terminated: bool, **extra) -> None:
        """One step and its extra fields."""
        t = int(self.recorder.steps[0])
        self.recorder.add_steps(t, self.row, np.asarray(actions)[None], np.array([reward]), np.array([terminated]))
        self.recorder.add_extras(t, self.row, {k: np.asarray(v)[None] for k, v in extra.items()})

    def episode(self) -> EpisodeBatch:
        """The episode as a batch of one, padded to ``info.episode_limit`` steps."""
        return self.recorder.batch()


class ReplayBuffer:
    """The last ``capacity`` episodes; uniform sampling of whole episodes."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ConfigError(f"replay capacity {capacity} must be >= 1")
        self.capacity = capacity
        self.storage: dict[str, torch.Tensor] | None = None
        self.count = 0  # episodes ever inserted
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def insert(self, batch: EpisodeBatch) -> None:
        if self.storage is None:
            self.storage = {
                k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype) for k, v in batch.data.items()
            }
        for i in range(batch.size):
            slot = self.count % self.capacity
            for key, value in batch.data.items():
                self.storage[key][slot] = value[i]
            self.count += 1

    def can_sample(self, batch_size: int) -> bool:
        return len(self) >= batch_size

    def sample(self, batch_size: int) -> EpisodeBatch:
        if not self.can_sample(batch_size):
            raise ConfigError(f"the buffer holds {len(self)} episodes; cannot sample {batch_size}")
        idx = torch.as_tensor(self.rng.choice(len(self), batch_size, replace=False))
        return EpisodeBatch({k: v[idx] for k, v in self.storage.items()})


class EpisodeRollout(ReplayBuffer):
    """On-policy storage: the episodes collected since the last update, handed out together once.

    The replay's interface (``insert``, ``can_sample``, ``sample``) and layout, so the run loop and its checkpoints
    treat both alike; :meth:`sample` returns *every* held episode in collection order (at least ``batch_size``:
    the run loop collects whole runner batches) and empties the storage."""

    def insert(self, batch: EpisodeBatch) -> None:
        if self.count + batch.size > self.capacity:
            raise ConfigError(f"the rollout holds {self.count} of {self.capacity} episodes; cannot add {batch.size} "
                              "(sample it first)")  # fmt: skip
        super().insert(batch)

    def sample(self, batch_size: int) -> EpisodeBatch:
        if not self.can_sample(batch_size):
            raise ConfigError(f"the rollout holds {len(self)} episodes; cannot hand out {batch_size}")
        held, self.count = self.count, 0
        return EpisodeBatch({k: v[:held].clone() for k, v in self.storage.items()})
