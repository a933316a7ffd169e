"""Model registry in the style of timm's ``@register_model``: a name maps to a config dataclass and a builder.

Recipes name a model and give keyword overrides; :func:`build_model` turns those into a validated
config and a module. Tests iterate :func:`list_models`, so every registered model is checked for
shapes, finite gradients and a few steps of learning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from leantrain.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class _ModelEntry:
    config_cls: type
    build: Callable[[Any], nn.Module]
    description: str


_MODELS: dict[str, _ModelEntry] = {}
_TOKENIZERS: dict[str, Callable[[], Any]] = {}


def register_model(name: str, config_cls: type, description: str) -> Callable[[Callable], Callable]:
    """Decorator registering ``build(config) -> nn.Module`` under ``name`` with its config dataclass."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls for model {name!r} must be a dataclass, got {config_cls!r}")

    def decorator(build: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        old = _MODELS.get(name)
        # Re-registering the same function (a module reload) is harmless; a different one is a name clash.
        if old is not None and _qualname(old.build) != _qualname(build):
            raise ValueError(f"model {name!r} is already registered by {_qualname(old.build)}")
        _MODELS[name] = _ModelEntry(config_cls, build, description)
        return build

    return decorator


def register_tokenizer(name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator registering a zero-argument tokenizer loader for the pretrained model ``name``."""

    def decorator(load: Callable[[], Any]) -> Callable[[], Any]:
        _TOKENIZERS[name] = load
        return load

    return decorator


def list_models() -> dict[str, str]:
    """Registered model names mapped to their one-line descriptions, sorted by name."""
    return {name: _MODELS[name].description for name in sorted(_MODELS)}


def model_config_class(name: str) -> type:
    """The config dataclass of model ``name``; ConfigError listing the valid names if unknown."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name].config_cls


def make_model_config(name: str, **kwargs: Any) -> Any:
    """Build and validate the config dataclass of model ``name`` from keyword overrides."""
    config_cls = model_config_class(name)
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = [key for key in kwargs if key not in valid]
    if unknown:
        raise ConfigError(
            f"unknown field(s) {', '.join(map(repr, unknown))} for model {name!r}; valid fields: {', '.join(valid)}"
        )
    return config_cls(**kwargs)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Validate ``kwargs`` into model ``name``'s config (see :func:`make_model_config`) and build the model."""
    config = make_model_config(name, **kwargs)
    return _MODELS[name].build(config)


def tokenizer_names() -> list[str]:
    """Names of pretrained models whose tokenizer :func:`load_tokenizer` can load."""
    return sorted(_TOKENIZERS)


def load_tokenizer(name: str) -> Any:
    """The Hugging Face tokenizer of a pretrained model ("minilm", "smollm2-135m"); ConfigError otherwise."""
    if name not in _TOKENIZERS:
        raise ConfigError(
            f"model {name!r} has no tokenizer; models with a tokenizer: {', '.join(sorted(_TOKENIZERS))}"
        )
    return _TOKENIZERS[name]()


def _qualname(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"
