"""Device profiles and the simulated clock of a synchronous federated round.

A client's round time is its local compute plus its transfers:
``samples × work × sample_time_s × compute_factor + down_bytes / downlink + up_bytes / uplink + latency × messages``
where ``work`` is the fraction of a full forward/backward the client runs (1 for full training; EmbracingFL's weak
clients run less) and ``sample_time_s`` the strong device's time per training sample. A synchronous round lasts as
long as its slowest responding client. The clock is a model, deterministic by construction (so a resumed run has
the same history); it is what EmbracingFL, TimelyFL and biased local SGD reason about.

The three profiles are our choice (the papers describe the classes, not numbers): weak devices compute 4× slower
than strong ones and have about 15% of their training memory (EmbracingFL's "about 15%"), moderate 2× and 40%.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def advance(self, client_times: list[float]) -> float:
        """End a synchronous round: it lasts as long as its slowest client; returns the round's duration."""
        duration = max(client_times, default=0.0)
        self.now += duration
        return duration
