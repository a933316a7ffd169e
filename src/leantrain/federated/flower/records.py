"""Our messages as Flower records, byte for byte what the ledger counts.

- An :class:`~leantrain.federated.algorithms.base.Instruction` becomes an ``ArrayRecord`` (one ``Array`` per
  tensor, its ``data`` the ``.npy`` bytes of :func:`leantrain.federated.comm.encode_arrays`, so
  ``len(array.data) == wire_nbytes(tensor)``) and a ``ConfigRecord`` holding the round, the client id and the
  algorithm's config as one compact sorted JSON string (its length is exactly ``config_nbytes(config)``).
- A :class:`~leantrain.federated.algorithms.base.Reply` becomes an ``ArrayRecord`` and a ``MetricRecord`` (numeric
  metrics; Flower's ``num-examples`` is set to ``num_examples``, the client's dataset size).

bfloat16, which numpy lacks, travels as its 16-bit pattern (as in the ledger) with ``Array.dtype = "bfloat16"``,
and is viewed back on arrival. The round and client id are transport metadata, like Flower's own message
metadata: the ledger, like the simulator's, counts only the algorithm's tensors and config.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from leantrain.errors import LeantrainError
from leantrain.federated.algorithms.base import Instruction, Reply
from leantrain.federated.comm import encode_arrays

ARRAYS = "arrays"  # RecordDict keys (Flower's conventional names)
CONFIG = "config"
METRICS = "metrics"
STATE = "leantrain-client-state"  # context.state key holding a client's persistent tensors
ROUND, CLIENT, ALGORITHM_CONFIG = "leantrain-round", "leantrain-cid", "leantrain-config"
SENT_BYTES, RECEIVED_BYTES = "leantrain-sent-bytes", "leantrain-received-bytes"
_NUMPY_STYPE = "numpy.ndarray"


class MalformedMessageError(LeantrainError):
    """A Flower message does not carry what a leantrain app expects (wrong app, or a tampered message)."""


def to_array_record(arrays: dict[str, torch.Tensor]) -> ArrayRecord:
    """Tensors -> ArrayRecord whose ``Array.data`` are our ``.npy`` wire bytes (order kept)."""
    blobs = encode_arrays(arrays)
    record = {}
    for name, t in arrays.items():
        dtype = "bfloat16" if t.dtype == torch.bfloat16 else str(np.dtype(_numpy_dtype(t.dtype)))
        record[name] = Array(dtype=dtype, shape=tuple(int(s) for s in t.shape), stype=_NUMPY_STYPE, data=blobs[name])
    return ArrayRecord(record)


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> tensors (``allow_pickle=False``; bfloat16 restored from its 16-bit pattern)."""
    out = {}
    for name, array in record.items():
        if array.stype != _NUMPY_STYPE:
            raise MalformedMessageError(f"array {name!r} has stype {array.stype!r}; expected {_NUMPY_STYPE!r}")
        t = torch.from_numpy(array.numpy().copy())
        out[name] = t.view(torch.bfloat16) if array.dtype == "bfloat16" else t
    return out


def record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord as Flower carries it (the sum of its ``Array.data`` lengths)."""
    return sum(len(array.data) for array in record.values())


def instruction_config(round_idx: int, cid: int, instruction: Instruction) -> ConfigRecord:
    text = json.dumps(instruction.config, separators=(",", ":"), sort_keys=True) if instruction.config else ""
    return ConfigRecord({ROUND: int(round_idx), CLIENT: int(cid), ALGORITHM_CONFIG: text})


def read_instruction(content) -> tuple[int, int, Instruction]:
    """(round, client id, instruction) from a train message's RecordDict."""
    if ARRAYS not in content.array_records or CONFIG not in content.config_records:
        raise MalformedMessageError("a leantrain train message needs an 'arrays' ArrayRecord and a 'config' record")
    config = content.config_records[CONFIG]
    for key in (ROUND, CLIENT, ALGORITHM_CONFIG):
        if key not in config:
            raise MalformedMessageError(f"the train message's config lacks {key!r}; was it sent by a leantrain app?")
    text = config[ALGORITHM_CONFIG]
    algorithm_config = json.loads(text) if text else {}
    return int(config[ROUND]), int(config[CLIENT]), Instruction(from_array_record(content.array_records[ARRAYS]),
                                                                algorithm_config)  # fmt: skip


def to_metric_record(metrics: dict[str, Any], **extra: float) -> MetricRecord:
    """Numeric metrics (bools as 0/1; non-finite and non-numeric values dropped) plus Flower's ``num-examples``
    (the client's dataset size ``num_examples`` when present)."""
    out: dict[str, int | float] = {}
    for key, value in {**metrics, **extra}.items():
        if isinstance(value, bool | np.bool_):
            out[key] = int(value)
        elif isinstance(value, int | np.integer):
            out[key] = int(value)
        elif isinstance(value, float | np.floating) and math.isfinite(float(value)):
            out[key] = float(value)
    out.setdefault("num-examples", int(out.get("num_examples", out.get("samples", 1))))
    return MetricRecord(out)


def read_reply(content) -> Reply:
    """A Reply from a train reply's RecordDict (metrics keep Flower's ``num-examples`` and our byte counters).

    Whatever a client sent, this returns a Reply or raises :class:`MalformedMessageError`: bytes that do not decode
    as an ``.npy`` array, object (pickled) dtypes, wrong records or metrics of the wrong type are all "malformed".
    """
    try:
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            raise MalformedMessageError("a leantrain reply needs an 'arrays' ArrayRecord and a 'metrics' MetricRecord")
        return Reply(from_array_record(content.array_records[ARRAYS]), dict(content.metric_records[METRICS]))
    except MalformedMessageError:
        raise
    except Exception as err:  # noqa: BLE001 - anything a client sends must be rejected, never crash the server
        raise MalformedMessageError(f"the reply does not decode ({type(err).__name__}: {err})") from None


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype
