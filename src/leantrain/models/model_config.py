"""Shared base for model config dataclasses: YAML-friendly type coercion and range checks.

Every model config is a dataclass whose fields carry ``metadata={"help": ...}`` and a default. Recipes
arrive as YAML, so lists are accepted for tuple fields (and converted), ints for float fields, and
everything else is checked against the annotation. Range checks raise :class:`ConfigError` with a
message that names the field, the bad value and the accepted range.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from leantrain.errors import ConfigError
from leantrain.field_types import coerce


@dataclasses.dataclass
class ModelConfig:
    """Base for model configs: coerces field types in ``__post_init__`` and then calls :meth:`validate`."""

    def __post_init__(self) -> None:
        for name, annotation in _field_types(type(self)).items():
            setattr(self, name, coerce(getattr(self, name), annotation, f"{type(self).__name__}.{name}"))
        self.validate()

    def validate(self) -> None:
        """Check value ranges and cross-field constraints; subclasses override."""


def fail(config: Any, name: str, accepted: str) -> typing.NoReturn:
    """Raise a ConfigError for ``config.<name>``, naming its current value and what is accepted."""
    value = getattr(config, name)
    raise ConfigError(f"{type(config).__name__}.{name}={value!r} is invalid; accepted: {accepted}")


def check(config: Any, name: str, ok: bool, accepted: str) -> None:
    """Raise (via :func:`fail`) unless ``ok``."""
    if not ok:
        fail(config, name, accepted)


def check_positive(config: Any, *names: str) -> None:
    """Each named int field (or every element of a tuple field) must be >= 1."""
    for name in names:
        value = getattr(config, name)
        items = value if isinstance(value, tuple) else (value,)
        check(config, name, all(v >= 1 for v in items), "integers >= 1")


def check_dropout(config: Any, name: str = "dropout") -> None:
    """A dropout probability must lie in [0, 1)."""
    value = getattr(config, name)
    check(config, name, 0.0 <= value < 1.0, "a float in [0, 1)")


def as_image_shape(config: Any, name: str = "input_shape") -> tuple[int, int, int]:
    """Read ``config.<name>`` as (C, H, W); a 2-tuple (H, W) means one channel."""
    shape = getattr(config, name)
    check(config, name, len(shape) in (2, 3) and all(s >= 1 for s in shape), "(C, H, W) or (H, W), all >= 1")
    return (1, *shape) if len(shape) == 2 else tuple(shape)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}
