"""Time across workers of different speed: a deterministic virtual clock, or wall-clock time with emulated slowdowns.

- :class:`VirtualClock` (``hetero.clock=virtual``): a step of worker j costs ``step_time_s * slowdown_j`` seconds; a
  round lasts as long as its busiest worker, and the others wait the difference. Nothing sleeps, so accuracy
  against (virtual) time is deterministic and the workers may share one process (the official code also runs
  several workers in one MPI rank).
- :class:`WallClock` (``hetero.clock=real``): real processes, real time. A worker ``s`` times slower is emulated
  honestly the way FedML's heterogeneous simulation does it: after computing for ``c`` seconds it sleeps
  ``(s - 1) * c`` seconds, so its busy time is ``s`` times its own measured compute. Waiting is the time spent
  blocked in the synchronisation collectives. Evaluation is paused out of the clock (:meth:`WallClock.paused`).

Both count per worker: ``busy_s`` (computing, emulated slowdown included), ``wait_s`` (idle at synchronisation)
and ``steps``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence


class VirtualClock:
    """Deterministic time: worker j's step costs ``step_time_s * slowdowns[j]``; a round lasts its slowest worker."""

    real = False

    def __init__(self, slowdowns: Sequence[float], step_time_s: float):
        self.slowdowns = list(slowdowns)
        self.step_time_s = float(step_time_s)
        self.now_s = 0.0
        self.busy_s = [0.0] * len(self.slowdowns)
        self.wait_s = [0.0] * len(self.slowdowns)
        self.steps = [0] * len(self.slowdowns)

    def worked(self, worker: int, steps: int, compute_s: float) -> None:
        """Nothing to do: virtual time is accounted for the whole round in :meth:`round_done`."""

    def round_done(self, steps: Sequence[int], waited_s: float = 0.0) -> None:
        """Every worker took ``steps[j]`` steps since the last synchronisation; advance to the slowest's finish."""
        busy = [h * s * self.step_time_s for h, s in zip(steps, self.slowdowns, strict=True)]
        span = max(busy)
        for j, b in enumerate(busy):
            self.busy_s[j] += b
            self.wait_s[j] += span - b
            self.steps[j] += steps[j]
        self.now_s += span

    def elapsed(self) -> float:
        return self.now_s

    def restart(self) -> None:
        """Nothing to do: virtual time starts at zero."""

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        yield


class WallClock:
    """Wall-clock time of this process, evaluation paused out; worker slowdowns emulated by sleeping (``emulate``;
    off on genuinely heterogeneous devices, where the slowdowns only set the step counts)."""

    real = True

    def __init__(self, slowdowns: Sequence[float], hosted: Sequence[int], emulate: bool = True):
        self.slowdowns = list(slowdowns) if emulate else [1.0] * len(slowdowns)
        self.hosted = list(hosted)
        self.busy_s = [0.0] * len(self.slowdowns)
        self.wait_s = [0.0] * len(self.slowdowns)
        self.steps = [0] * len(self.slowdowns)
        self.start = time.perf_counter()
        self.paused_s = 0.0

    def worked(self, worker: int, steps: int, compute_s: float) -> None:
        """Worker ``worker`` computed ``steps`` steps in ``compute_s`` seconds: sleep its emulated slowdown."""
        extra = (self.slowdowns[worker] - 1.0) * compute_s
        if extra > 0:
            time.sleep(extra)
        self.busy_s[worker] += compute_s + extra
        self.steps[worker] += steps

    def round_done(self, steps: Sequence[int], waited_s: float = 0.0) -> None:
        """The hosted worker spent ``waited_s`` blocked in this round's synchronisation."""
        for j in self.hosted:
            self.wait_s[j] += waited_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused_s

    def restart(self) -> None:
        """Time starts now (every process has built its model and joined: start-up is not training time)."""
        self.start, self.paused_s = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - started
