"""Episode batches and the episode replay buffer (PyMARL's data layout).

An episode of length T (≤ the environment's limit) is stored as tensors over T + 1 time slots, padded to the
limit: ``obs`` (T+1, N, obs_dim), ``state`` (T+1, state_dim), ``avail`` (T+1, N, n_actions), then per step
``actions`` (T, N), ``reward`` (T,), ``terminated`` (T,) and ``filled`` (T,) (1 for real steps, 0 for
padding). A batch stacks episodes along a leading dimension B. Extra per-step fields (``extra_fields``, stored as
``step_<name>``) and per-slot fields (``slot_fields``, stored under their name, T+1 slots) let methods record what
they need (which agents an attack controlled, the unmasked observations) without touching this module.
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


class EpisodeRecorder:
    """Collects one episode step by step, then yields it padded to the episode limit."""

    def __init__(self, info: EnvInfo, extra_fields: dict[str, tuple[int, ...]] | None = None,
                 slot_fields: dict[str, tuple[int, ...]] | None = None):  # fmt: skip
        self.info = info
        self.extra_fields = extra_fields or {}
        self.slot_fields = slot_fields or {}
        self.obs, self.state, self.avail, self.actions, self.reward, self.terminated = [], [], [], [], [], []
        self.extra: dict[str, list] = {k: [] for k in self.extra_fields}
        self.slot_extra: dict[str, list] = {k: [] for k in self.slot_fields}

    def add_observation(self, obs: np.ndarray, state: np.ndarray, avail: np.ndarray, **slot) -> None:
        self.obs.append(obs)
        self.state.append(state)
        self.avail.append(avail)
        for key in self.slot_fields:
            self.slot_extra[key].append(slot[key])

    def add_step(self, actions: np.ndarray, reward: float, terminated: bool, **extra) -> None:
        """One step; its extra fields now or later through :meth:`add_extra`."""
        self.actions.append(actions)
        self.reward.append(reward)
        self.terminated.append(terminated)
        if extra:
            self.add_extra(**extra)

    def add_extra(self, **extra) -> None:
        """The extra fields of the latest step."""
        for key in self.extra_fields:
            self.extra[key].append(extra[key])

    def episode(self) -> EpisodeBatch:
        """The episode as a batch of one, padded to ``info.episode_limit`` steps."""
        info, t = self.info, len(self.actions)
        limit = info.episode_limit
        if len(self.obs) != t + 1:
            raise ConfigError(f"an episode of {t} steps needs {t + 1} observations, got {len(self.obs)}")

        def pad(items: list, length: int, shape: tuple, dtype) -> torch.Tensor:
            out = np.zeros((length, *shape), dtype=dtype)
            if items:
                out[: len(items)] = np.asarray(items, dtype=dtype).reshape(len(items), *shape)
            return torch.as_tensor(out)[None]

        n, k = info.n_agents, info.n_actions
        data = {
            "obs": pad(self.obs, limit + 1, (n, info.obs_dim), np.float32),
            "state": pad(self.state, limit + 1, (info.state_dim,), np.float32),
            "avail": pad(self.avail, limit + 1, (n, k), np.bool_),
            "actions": pad(self.actions, limit, (n,), np.int64),
            "reward": pad(self.reward, limit, (), np.float32),
            "terminated": pad(self.terminated, limit, (), np.float32),
            "filled": pad([1.0] * t, limit, (), np.float32),
        }
        data["avail"][0, t + 1 :] = True  # padding slots: any action "available" so masked maxima stay finite
        for key, shape in self.extra_fields.items():
            data[f"step_{key}"] = pad(self.extra[key], limit, shape, np.float32)
        for key, shape in self.slot_fields.items():
            data[key] = pad(self.slot_extra[key], limit + 1, shape, np.float32)
        return EpisodeBatch(data)


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
