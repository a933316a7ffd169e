"""Checkpoints in safetensors + JSON (never pickle), written atomically, enough to resume exactly.

A checkpoint folder ``checkpoints/step-00000120/`` holds:

- ``model.safetensors``: the model's state dict (shared/tied tensors handled by ``safetensors.torch.save_model``);
- ``optimizer.safetensors`` + the optimizer's non-tensor structure inside ``state.json``;
- ``rng.safetensors``: torch's CPU generator state, so dropout after a resume matches an uninterrupted run;
- ``state.json``: step, epoch, batches done in the epoch, and whatever the loop adds (best metric, ...).

The folder is written under a temporary name and renamed, so a crash mid-write never leaves a checkpoint
that looks complete. ``state.json`` also records the SHA-256 of every other file, so a checkpoint damaged later
(a truncated copy, a full disk, a torn ``state.json``) is recognised: :func:`latest_intact_checkpoint` skips it
with a one-line warning, moves it aside as ``corrupt-step-XXXXXXXX`` and resumes from the newest intact one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from leantrain.errors import ConfigError, LeantrainError

_TENSOR = "__tensor__"
_PAIRS = "__pairs__"
_TUPLE = "__tuple__"


def pack_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Split a nested state (dicts, lists, numbers, tensors) into JSON and a flat tensor dict."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack_state(v, tensors, prefix) for k, v in obj.items()}
        return {_PAIRS: [[k, pack_state(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [pack_state(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [pack_state(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__}")


def unpack_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack_state`."""
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _PAIRS in obj:
            return {k: unpack_state(v, tensors) for k, v in obj[_PAIRS]}
        if _TUPLE in obj:
            return tuple(unpack_state(v, tensors) for v in obj[_TUPLE])
        return {k: unpack_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack_state(v, tensors) for v in obj]
    return obj


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict, keep: int = 2
) -> Path:
    """Write ``directory/step-XXXXXXXX`` atomically and keep only the ``keep`` most recent checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{state['step']:08d}"
    tmp = directory / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    meta = dict(state)
    if optimizer is not None:
        opt_tensors: dict[str, torch.Tensor] = {}
        meta["optimizer"] = pack_state(optimizer.state_dict(), opt_tensors)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    meta["files"] = _digests(tmp)
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    _fsync_tree(tmp)  # the data is on disk before the name says the checkpoint is complete
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_tree(directory, files=False)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_state_checkpoint(directory: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write a nested state (JSON + tensors, via :func:`pack_state`) to ``directory/step-XXXXXXXX`` atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    packed = pack_state(state, tensors)
    save_file(tensors, str(tmp / "tensors.safetensors"))
    meta = {"step": step, "state": packed, "files": _digests(tmp)}
    (tmp / "state.json").write_text(json.dumps(meta))
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_tree(directory, files=False)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state_checkpoint(path: Path) -> tuple[int, dict]:
    """(step, state) written by :func:`save_state_checkpoint`."""
    if not (path / "state.json").is_file() or not (path / "tensors.safetensors").is_file():
        raise LeantrainError(f"{path} is not a leantrain state checkpoint (no state.json / tensors.safetensors)")
    meta = json.loads((path / "state.json").read_text())
    return meta["step"], unpack_state(meta["state"], load_file(str(path / "tensors.safetensors")))


def _fsync_tree(folder: Path, files: bool = True) -> None:
    """fsync the files in ``folder`` (optionally) and the folder itself, so a rename after it is durable."""
    if files:
        for path in folder.iterdir():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.name != "state.json"}


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` is not intact (unreadable state.json, a file missing, changed or
    truncated), or None if it is."""
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"state.json is unreadable ({type(err).__name__})"
    if not isinstance(meta, dict) or "step" not in meta:
        return "state.json holds no loop state"
    files = meta.get("files")
    if files is None:  # written before digests were recorded: check that every safetensors file parses whole
        return _safetensors_problem(path)
    for name, digest in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if _sha256(path / name) != digest:
            return f"{name} does not match its recorded SHA-256 (truncated or overwritten)"
    return None


def _safetensors_problem(path: Path) -> str | None:
    for file in sorted(path.glob("*.safetensors")):
        try:
            load_file(str(file))
        except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for damaged files
            return f"{file.name} cannot be read ({type(err).__name__})"
    return None


def latest_intact_checkpoint(directory: Path, what: str = "resume") -> Path:
    """The newest intact checkpoint in ``directory``; damaged newer ones are moved aside with a one-line warning.

    Raises :class:`ConfigError` (one line) when there is no checkpoint or none is intact."""
    candidates = sorted(p for p in directory.glob("step-*") if p.is_dir()) if directory.is_dir() else []
    if not candidates:
        raise ConfigError(f"{what}: no checkpoint to resume from in {directory}")
    for path in reversed(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        aside = path.with_name(f"corrupt-{path.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        print(f"warning: skipping damaged checkpoint {path.name} ({problem}); moved to {aside.name}", file=sys.stderr)
    raise ConfigError(
        f"{what}: none of the {len(candidates)} checkpoints in {directory} is intact (moved aside as "
        "corrupt-step-*); start the run again"
    )


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step-*") if (p / "state.json").is_file())


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model, optimizer and RNG from a checkpoint folder; return its loop state."""
    if not (path / "state.json").is_file():
        raise LeantrainError(f"{path} is not a leantrain checkpoint (no state.json)")
    meta = json.loads((path / "state.json").read_text())
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        raise LeantrainError(f"checkpoint {path} does not fit this model ({detail})")
    packed_opt = meta.pop("optimizer", None)
    if optimizer is not None and packed_opt is not None:
        optimizer.load_state_dict(unpack_state(packed_opt, load_file(str(path / "optimizer.safetensors"))))
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["cpu"])
    return meta
