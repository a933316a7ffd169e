"""Exact resume of MARL runs: everything the training loop's future depends on, in safetensors + JSON.

A checkpoint (``checkpoints/step-<t_env>/``, written after every periodic test through
:func:`leantrain.train.checkpoint.save_state_checkpoint`, atomically) holds the learner's networks, optimizer
states and counters, the filled part of the replay, every runner's episode counter and random generators (and
its hook's: S2Q's behaviour, the Wolfpack attack), torch's generator, the shifting game's episode clock and the
loop's counters. ``leantrain run resume=<run folder>`` then continues as if never stopped: the final
networks and the metrics are the same as an uninterrupted run's (tested), and ``marl.max_steps`` may be raised.
"""

from __future__ import annotations

import numpy as np
import torch

from leantrain.marl.episodes import ReplayBuffer


def _rng(holder) -> dict | None:
    rng = getattr(holder, "rng", None)
    return rng.bit_generator.state if isinstance(rng, np.random.Generator) else None


def _set_rng(holder, state: dict | None) -> None:
    if state is not None:
        holder.rng.bit_generator.state = state


def capture(loop: dict, learner, buffer: ReplayBuffer, runners: dict, clock) -> dict:
    """The resumable state of a MARL run (``runners``: name -> EpisodeRunner, ``clock``: EpisodeClock or None)."""
    filled = len(buffer)
    return {
        "loop": loop,
        "learner": learner.training_state(),
        "buffer": {
            "count": buffer.count,
            "rng": _rng(buffer),
            "storage": {k: v[:filled] for k, v in (buffer.storage or {}).items()},
        },  # fmt: skip
        "runners": {
            name: {
                "episodes": r.episodes,
                "rng": _rng(r),
                "hook_rng": _rng(r.action_hook),
                "generator": r.generator.get_state(),
            }  # fmt: skip
            for name, r in runners.items()
        },  # fmt: skip
        "torch_rng": torch.get_rng_state(),
        "clock": None if clock is None else clock.episodes,
    }


def restore(state: dict, learner, buffer: ReplayBuffer, runners: dict, clock) -> dict:
    """Put a captured state back; returns the loop counters."""
    learner.load_training_state(state["learner"])
    saved = state["buffer"]
    buffer.count = saved["count"]
    _set_rng(buffer, saved["rng"])
    if saved["storage"]:
        buffer.storage = {}
        for key, value in saved["storage"].items():
            full = torch.zeros((buffer.capacity, *value.shape[1:]), dtype=value.dtype)
            full[: len(value)] = value
            buffer.storage[key] = full
    for name, runner in runners.items():
        r = state["runners"][name]
        runner.episodes = r["episodes"]
        _set_rng(runner, r["rng"])
        _set_rng(runner.action_hook, r["hook_rng"])
        if "generator" in r:  # checkpoints written before the runner kept one generator have none
            runner.generator.set_state(r["generator"])
    torch.set_rng_state(state["torch_rng"])
    if clock is not None and state["clock"] is not None:
        clock.episodes = state["clock"]
    return state["loop"]
