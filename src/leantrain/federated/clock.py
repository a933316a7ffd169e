"""Device profiles, the simulated clock of a federated round and the event queue of asynchronous training.

A client's round time is its local compute plus its transfers: ``samples × work × sample_time_s × compute_factor +
down_bytes / downlink + up_bytes / uplink + latency × messages`` where ``work`` is the fraction of a full
forward/backward the client runs (1 for full training; EmbracingFL's weak clients run less) and ``sample_time_s`` the
strong device's time per training sample. A synchronous round lasts as long as its slowest responding client, or
exactly its deadline when the algorithm sets one (TimelyFL). Asynchronous algorithms (FedBuff) advance the clock from
event to event of an :class:`EventQueue`. The clock is a model, deterministic by construction (so a resumed run has the
same history); it is what EmbracingFL, TimelyFL and biased local SGD reason about.

:func:`lognormal_profiles` gives every client its own profile (compute and bandwidth factors drawn lognormally, the
FedScale-like spread of the TimelyFL spec's CPU plan) instead of three classes.

The three profiles are our choice (the papers describe the classes, not numbers): weak devices compute 4× slower
than strong ones and have about 15% of their training memory (EmbracingFL's "about 15%"), moderate 2× and 40%.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from leantrain.errors import ConfigError


@dataclass(frozen=True)
class DeviceProfile:
    """A class of client device: relative compute time, link speeds (bits/s), latency, memory share."""

    name: str
    compute_factor: float
    uplink_bps: float
    downlink_bps: float
    latency_s: float
    memory_fraction: float


PROFILES = {
    "strong": DeviceProfile("strong", 1.0, 20e6, 50e6, 0.05, 1.0),
    "moderate": DeviceProfile("moderate", 2.0, 5e6, 20e6, 0.1, 0.4),
    "weak": DeviceProfile("weak", 4.0, 1e6, 5e6, 0.2, 0.15),
}


def profile(name: str) -> DeviceProfile:
    if name not in PROFILES:
        raise ConfigError(f"unknown device profile {name!r}; choices: {', '.join(PROFILES)}")
    return PROFILES[name]


def assign_profiles(num_clients: int, mix: dict[str, float] | None, seed: int = 0) -> list[str]:
    """Profile names for ``num_clients`` clients: ``mix`` maps profile -> share (None: all strong).

    Counts are rounded down per class, the remainder goes to "strong", and the order is a seeded shuffle.
    """
    import numpy as np

    if not mix:
        return ["strong"] * num_clients
    for name, share in mix.items():
        profile(name)
        if not isinstance(share, int | float) or isinstance(share, bool) or not 0 <= share <= 1:
            raise ConfigError(f"profile share {name}={share!r} is invalid; expected a number in [0, 1]")
    if sum(mix.values()) > 1 + 1e-9:
        raise ConfigError(f"profile shares {mix} add up to more than 1")
    names: list[str] = []
    for name, share in mix.items():
        names += [name] * int(share * num_clients)
    names += ["strong"] * (num_clients - len(names))
    order = np.random.default_rng(seed).permutation(num_clients)
    return [names[i] for i in order]


class SimulatedClock:
    """Seconds of simulated time: per-client round times and the running total over rounds."""

    def __init__(self, sample_time_s: float = 1e-3):
        if not sample_time_s > 0:
            raise ConfigError(f"sample_time_s={sample_time_s!r} is invalid; expected > 0")
        self.sample_time_s = sample_time_s
        self.now = 0.0

    def client_time(self, device: DeviceProfile, samples: int, work: float, down_bytes: int, up_bytes: int,
                    messages: int) -> float:  # fmt: skip
        compute = samples * work * self.sample_time_s * device.compute_factor
        transfer = 8 * down_bytes / device.downlink_bps + 8 * up_bytes / device.uplink_bps
        return compute + transfer + device.latency_s * messages


def lognormal_profiles(num_clients: int, compute_sigma: float = 1.0, bandwidth_sigma: float = 1.0,
                       seed: int = 0, base: str = "strong") -> list[DeviceProfile]:  # fmt: skip
    """One profile per client: the ``base`` profile with its compute time multiplied by exp(N(0, compute_sigma²))
    and both link speeds divided by exp(N(0, bandwidth_sigma²)) (sigma 1: a ~10x spread between the 5th and 95th
    percentiles). Names are ``"<base>-<cid>"``; memory shares stay the base's."""
    import numpy as np

    for name, sigma in (("compute_sigma", compute_sigma), ("bandwidth_sigma", bandwidth_sigma)):
        if not isinstance(sigma, int | float) or isinstance(sigma, bool) or sigma < 0:
            raise ConfigError(f"lognormal_profiles {name}={sigma!r} is invalid; expected a number >= 0")
    b = profile(base)
    rng = np.random.default_rng(seed)
    speed = np.exp(rng.normal(0.0, compute_sigma, num_clients))
    link = np.exp(rng.normal(0.0, bandwidth_sigma, num_clients))
    return [DeviceProfile(f"{base}-{i}", b.compute_factor * float(speed[i]), b.uplink_bps / float(link[i]),
                          b.downlink_bps / float(link[i]), b.latency_s, b.memory_fraction)
            for i in range(num_clients)]  # fmt: skip


class EventQueue:
    """Future events ordered by simulated time (ties: first pushed, first out): the asynchronous runtime's clock."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._pushed = 0

    def push(self, time_s: float, event: Any) -> None:
        heapq.heappush(self._heap, (float(time_s), self._pushed, event))
        self._pushed += 1

    def pop(self) -> tuple[float, Any]:
        time_s, _, event = heapq.heappop(self._heap)
        return time_s, event

    def __len__(self) -> int:
        return len(self._heap)

    def events(self) -> list[Any]:
        """The pending events in time order (for checkpoints and inspection)."""
        return [e for _, _, e in sorted(self._heap)]

    def state_dict(self) -> dict[str, Any]:
        return {"heap": sorted(self._heap, key=lambda x: (x[0], x[1])), "pushed": self._pushed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._heap = [tuple(x) for x in state["heap"]]
        heapq.heapify(self._heap)
        self._pushed = state["pushed"]
