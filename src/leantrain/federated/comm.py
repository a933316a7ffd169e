"""What clients and server send each other, and the byte ledger that counts it.

Every transfer is a message of named tensors plus a small JSON config (cut indices, layer lists, ...). A tensor's
wire size is its real serialized size in the ``.npy`` format (``numpy.save``: header + raw data), the format
Flower's ``Array`` carries, so the simulator's ledger and a Flower deployment count the same bytes; the config
is counted as its compact JSON encoding. :func:`encode_arrays` is the serializer itself (used by tests and by the
Flower adapter); :func:`wire_nbytes` computes the same number without serializing.

The ledger keeps, per round and per direction, bytes, messages and parameters, and per tensor how many times it
went up, which is the papers' own metric (FedLUAR: uplink parameters relative to FedAvg; FedLAMA: number of
synchronizations per layer).
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from leantrain.errors import ConfigError

DIRECTIONS = ("down", "up")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The array a tensor travels as (bfloat16, which numpy lacks, travels as its raw 16-bit pattern)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


@lru_cache(maxsize=4096)
def _npy_header_nbytes(shape: tuple[int, ...], descr: str) -> int:
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    if len(repr(header)) < 65000:  # numpy writes format 1.0 unless the header is enormous
        np.lib.format.write_array_header_1_0(buf, header)
    else:
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.tell()


def wire_nbytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` serialized as ``.npy`` (equal to ``len(encode_arrays({k: t})[k])``)."""
    dtype = torch.int16 if t.dtype == torch.bfloat16 else t.dtype
    descr = np.lib.format.dtype_to_descr(np.dtype(torch.empty((), dtype=dtype).numpy().dtype))
    return _npy_header_nbytes(tuple(t.shape), descr) + t.numel() * t.element_size()


def encode_arrays(arrays: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """Serialize each tensor as ``.npy`` bytes (no pickle)."""
    out = {}
    for name, t in arrays.items():
        buf = io.BytesIO()
        np.save(buf, to_numpy(t), allow_pickle=False)
        out[name] = buf.getvalue()
    return out


def decode_arrays(blobs: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_arrays` (``allow_pickle=False``: object arrays are refused)."""
    return {name: torch.from_numpy(np.load(io.BytesIO(b), allow_pickle=False).copy()) for name, b in blobs.items()}


def config_nbytes(config: dict[str, Any]) -> int:
    """Bytes of a message's control data: its compact JSON encoding (0 for an empty config)."""
    return len(json.dumps(config, separators=(",", ":"), sort_keys=True).encode()) if config else 0


def message_nbytes(arrays: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> int:
    """Bytes of one message: its tensors as Flower carries them plus its JSON config."""
    return sum(wire_nbytes(t) for t in arrays.values()) + config_nbytes(config or {})


class ByteLedger:
    """Counts every message sent down (server -> client) and up (client -> server), per round."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, float]] = defaultdict(_empty_round)
        self.tensor_uploads: dict[str, int] = defaultdict(int)  # name -> times it went up
        self.tensor_params: dict[str, int] = {}  # name -> numel

    def record(self, round_idx: int, client: int, direction: str, arrays: dict[str, torch.Tensor],
               config: dict[str, Any] | None = None) -> int:  # fmt: skip
        """Count one message; returns its size in bytes."""
        if direction not in DIRECTIONS:
            raise ConfigError(f"ledger direction={direction!r} is invalid; accepted: {DIRECTIONS}")
        nbytes = message_nbytes(arrays, config)
        params = sum(t.numel() for t in arrays.values())
        row = self.rounds[round_idx]
        row[f"{direction}_bytes"] += nbytes
        row[f"{direction}_messages"] += 1
        row[f"{direction}_params"] += params
        if direction == "up":
            for name, t in arrays.items():
                self.tensor_uploads[name] += 1
                self.tensor_params[name] = t.numel()
        return nbytes

    def round_totals(self, round_idx: int) -> dict[str, float]:
        return dict(self.rounds.get(round_idx, _empty_round()))

    def totals(self) -> dict[str, float]:
        out = _empty_round()
        for row in self.rounds.values():
            for k, v in row.items():
                out[k] += v
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds": {str(r): dict(row) for r, row in self.rounds.items()},
            "tensor_uploads": dict(self.tensor_uploads),
            "tensor_params": dict(self.tensor_params),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = defaultdict(_empty_round, {int(r): dict(row) for r, row in state["rounds"].items()})
        self.tensor_uploads = defaultdict(int, state["tensor_uploads"])
        self.tensor_params = dict(state["tensor_params"])


def _empty_round() -> dict[str, float]:
    return {f"{d}_{k}": 0 for d in DIRECTIONS for k in ("bytes", "messages", "params")}
