"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def lr_factor(
    kind: str,
    total_steps: int,
    warmup_steps: int = 0,
    steps_per_epoch: int = 1,
    decay_epochs: Sequence[int] = (),
    decay_factor: float = 0.1,
) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    ``constant``, ``cosine`` (to 0 at ``total_steps``), ``linear`` (to 0) or ``step`` (times ``decay_factor``
    from the first step of each epoch in ``decay_epochs``), each after a linear warm-up.
    """
    if kind not in ("constant", "cosine", "linear", "step"):
        raise ValueError(f"unknown schedule {kind!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        if kind == "step":
            epoch = step // steps_per_epoch
            return decay_factor ** sum(1 for e in decay_epochs if epoch >= e)
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor
