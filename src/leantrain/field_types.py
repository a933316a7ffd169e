"""Typed config fields: convert YAML and command-line values to a dataclass field's annotation.

Used by the recipe configs (:mod:`leantrain.config`) and the model configs
(:mod:`leantrain.models.model_config`), so a value is accepted or refused the same way everywhere:
lists become tuples, ints are accepted for floats (numpy integers too, e.g. a dataset's ``num_classes``),
and command-line strings such as ``"5e-5"`` or ``"[16, 32]"`` are parsed. Errors name the field and value.
"""

from __future__ import annotations

import numbers
import types
import typing
from typing import Any, Literal

import yaml

from leantrain.errors import ConfigError

_KIND = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Return ``value`` converted to ``annotation`` or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config: {where} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = parse_text(value)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config: {where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"config: {where} must have {len(args)} items, got {len(value)}")
        item = args[0] if args else Any
        return origin(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    return _scalar(value, annotation, where)


def _scalar(value: Any, tp: Any, where: str) -> Any:
    if tp not in _KIND:
        return value
    if isinstance(value, str) and tp is not str:
        value = _parse_scalar_text(value, tp)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if tp in (str, dict) and isinstance(value, tp):
        return value
    raise ConfigError(f"config: {where} must be {_KIND[tp]}, got {value!r}")


def _parse_scalar_text(text: str, tp: type) -> Any:
    lowered = text.strip().lower()
    if tp is bool and lowered in ("true", "false", "yes", "no", "1", "0"):
        return lowered in ("true", "yes", "1")
    try:
        return int(text) if tp is int else float(text) if tp is float else parse_text(text)
    except ValueError:
        return text


def parse_text(text: str) -> Any:
    """Parse a command-line value as YAML (``0.1``, ``[16, 32]``, ``null``); unparsable text stays a string."""
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text
