"""The server's intake of one round's replies, shared by both runtimes (the simulator and the Flower strategy).

Every sampled client ends the round in exactly one of four ways, counted and logged with its id and reason:

- ``dropped``: it never replied (dropout, lost connection);
- ``late``: it would reply after the round's deadline (``Algorithm.deadline``), so the server closed the round
  without it (its upload is not counted);
- ``failed``: its update raised (any exception on the client; the run goes on) or the transport reported an error;
- ``rejected``: its reply arrived but is malformed (:func:`check_reply`: names, shapes, dtypes, NaN/inf, metrics)
  or absurd (:class:`ReplyGuard`: an update far larger than the cohort's);
- ``responded``: its reply was accepted and folded into the algorithm.

Accepted replies are held until the round closes (the update-norm guard compares each reply with the whole
cohort) and are then passed to ``algorithm.accumulate`` in client-id order, so the aggregate does not depend on
the order replies arrived in. Memory: one round's replies (the cohort's uploads).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from leantrain.errors import ConfigError
from leantrain.federated.algorithms.base import Algorithm, Instruction, Reply

OUTCOMES = ("responded", "dropped", "failed", "rejected", "late")


def check_reply(reply: Reply, expected: dict[str, tuple]) -> str | None:
    """Why ``reply`` is malformed against ``expected`` (name -> (shape, dtype)), or None if it is well formed."""
    if not isinstance(reply, Reply) or not isinstance(reply.arrays, dict) or not isinstance(reply.metrics, dict):
        return f"not a Reply ({type(reply).__name__})"
    got, want = set(reply.arrays), set(expected)
    if got != want:
        extra, missing = sorted(map(str, got - want))[:3], sorted(want - got)[:3]
        return f"tensors differ from the expected ones (unexpected {extra}, missing {missing})"
    for name, (shape, dtype) in expected.items():
        t = reply.arrays[name]
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__}, not a tensor"
        if tuple(t.shape) != tuple(shape):
            return f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}"
        if t.dtype != dtype:
            return f"{name} has dtype {t.dtype}, expected {dtype}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{name} holds NaN or inf"
    if "num_examples" not in reply.metrics:
        return "metrics lack num_examples (the client's dataset size)"
    for key in ("samples", "num_examples"):
        value = reply.metrics.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or not np.isfinite(value):
            return f"metrics.{key}={value!r} is not a positive number"
    return None


@dataclass
class ReplyGuard:
    """Server-side guards against finite but absurd replies (on by default; ``ReplyGuard.off()`` disables both).

    - ``norm_ratio``: a reply is rejected when, for any tensor it carries, its update ``‖reply − server value‖``
      exceeds ``norm_ratio`` times the lower median of that tensor's update norms over the round's well-formed
      replies (the lower median, so with two replies the honest one is the reference). A tensor carried by a single
      reply, or whose median update is 0, is not checked. Default 100: honest clients of one cohort can differ by
      more than 10x (measured: a strong EmbracingFL client's output-layer update was 11x the median of a cohort of
      weak clients), while a broken or hostile reply (a wrong scale, an overflow) is off by orders of magnitude.
      This guard stops absurd replies, not a careful Byzantine client (use a robust aggregator for that).
      ``None`` disables it.
    - ``max_examples``: the most samples (dataset size, ``num_examples``) one client may claim; larger claims are
      capped and logged. The runtime also caps at what it knows (the simulator knows every client's partition).
      ``None``: no configured cap.
    """

    norm_ratio: float | None = 100.0
    max_examples: int | None = None

    def __post_init__(self) -> None:
        if self.norm_ratio is not None and (isinstance(self.norm_ratio, bool) or not self.norm_ratio > 1):
            raise ConfigError(f"ReplyGuard norm_ratio={self.norm_ratio!r} is invalid; expected a number > 1 or None")
        if self.max_examples is not None and (
            isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int) or self.max_examples < 1
        ):
            raise ConfigError(f"ReplyGuard max_examples={self.max_examples!r} is invalid; expected an integer >= 1")

    @classmethod
    def off(cls) -> ReplyGuard:
        return cls(norm_ratio=None, max_examples=None)


@dataclass
class _Pending:
    cid: int
    reply: Reply
    norms: dict[str, float] = field(default_factory=dict)


class RoundIntake:
    """One round's outcomes: ``dropped`` / ``failed`` / ``offer`` per client, then ``close()`` folds the accepted.

    ``known_examples(cid)`` is what the server knows of a client's dataset size (None: nothing), used to cap
    ``num_examples``. After ``close()``: ``counts``, ``events`` (one line per client that did not respond, or whose
    claim was capped) and ``accepted`` (client id -> reply, in client-id order).
    """

    def __init__(self, algorithm: Algorithm, round_idx: int, guard: ReplyGuard | None = None,
                 known_examples: Callable[[int], int | None] | None = None):  # fmt: skip
        self.algorithm, self.round = algorithm, round_idx
        self.guard = guard if guard is not None else ReplyGuard()
        self.known_examples = known_examples
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.events: list[str] = []
        self.accepted: dict[int, Reply] = {}
        self._pending: list[_Pending] = []
        self._closed = False

    def dropped(self, cid: int, why: str = "dropped out") -> None:
        self.counts["dropped"] += 1
        self.events.append(f"client {cid} {why}")

    def late(self, cid: int, finish_s: float | None, deadline_s: float) -> None:
        """The client would finish after the round's deadline (None: it was not scheduled, no work fits): the server
        closed the round without it."""
        self.counts["late"] += 1
        when = "no work fits" if finish_s is None else f"{finish_s:.2f} s"
        self.events.append(f"client {cid} late: {when} > deadline {deadline_s:.2f} s")

    def failed(self, cid: int, reason: str) -> None:
        self.counts["failed"] += 1
        self.events.append(f"client {cid} failed: {reason}")

    def rejected(self, cid: int, problem: str) -> None:
        self.counts["rejected"] += 1
        self.events.append(f"client {cid} rejected: {problem}")

    def offer(self, cid: int, instruction: Instruction, reply: Any) -> str | None:
        """Check one reply; a malformed one is rejected at once (returns why), a well-formed one is held."""
        problem = check_reply(reply, self.algorithm.expected_upload(self.round, cid, instruction))
        if problem is not None:
            self.rejected(cid, problem)
            return problem
        self._pending.append(_Pending(cid, reply))
        return None

    def close(self) -> dict[int, Reply]:
        """Apply the guards, fold the accepted replies into the algorithm in client-id order; the accepted ones."""
        if self._closed:
            raise RuntimeError("this round's intake is already closed")
        self._closed = True
        pending = sorted(self._pending, key=lambda p: p.cid)
        for p in pending:
            self._cap_examples(p)
        outliers = self._norm_outliers(pending) if self.guard.norm_ratio is not None else {}
        for p in pending:
            if p.cid in outliers:
                self.rejected(p.cid, outliers[p.cid])
                continue
            self.algorithm.accumulate(self.round, p.cid, p.reply)
            self.accepted[p.cid] = p.reply
            self.counts["responded"] += 1
        self._pending = []
        return self.accepted

    def _cap_examples(self, p: _Pending) -> None:
        claimed = p.reply.metrics.get("num_examples")
        if claimed is None:
            return
        caps = [c for c in (self.guard.max_examples, self.known_examples(p.cid) if self.known_examples else None)
                if c is not None]  # fmt: skip
        if caps and claimed > min(caps):
            p.reply.metrics["num_examples"] = min(caps)
            self.events.append(f"client {p.cid} claimed {claimed:g} samples; capped to {min(caps)}")

    def _norm_outliers(self, pending: list[_Pending]) -> dict[int, str]:
        by_name: dict[str, list[tuple[int, float]]] = {}
        for p in pending:
            for name, t in p.reply.arrays.items():
                if not t.is_floating_point():
                    continue
                ref = self.algorithm.reference(name)
                delta = t.double() - ref.double() if ref is not None and ref.shape == t.shape else t.double()
                by_name.setdefault(name, []).append((p.cid, float(torch.linalg.vector_norm(delta))))
        out: dict[int, str] = {}
        ratio = float(self.guard.norm_ratio)
        for name, norms in by_name.items():
            if len(norms) < 2:
                continue
            median = statistics.median_low(n for _, n in norms)
            if not median > 0:
                continue
            for cid, n in norms:
                if n > ratio * median and cid not in out:
                    out[cid] = (f"update of {name} has norm {n:.3g}, {n / median:.3g}x the cohort's median "
                                f"{median:.3g} (guard norm_ratio={ratio:g})")  # fmt: skip
        return out
