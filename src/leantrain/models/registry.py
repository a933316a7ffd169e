"""Model registry in the style of timm's ``@register_model``: a name maps to a config dataclass and a builder.

Recipes name a model and give keyword overrides; :func:`build_model` turns those into a validated
config and a module. Tests iterate :func:`list_models`, so every registered model is checked for
shapes, finite gradients and a few steps of learning.

The built-in models are listed as plain data (:data:`BUILTIN_MODELS`: defining module and description), so
``leantrain list`` and config checks name them without importing torch or transformers (over a second); the
defining module, whose ``@register_model`` records the config dataclass and builder, is imported on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from leantrain.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

# name -> (module that registers it, one-line description)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "cnn": ("leantrain.models.cnn", "LeNet-style CNN: conv3x3-ReLU-maxpool stages, then an MLP head"),
    "lstm": ("leantrain.models.lstm", "bidirectional LSTM text classifier over packed (unpadded) tokens"),
    "minilm": (
        "leantrain.models.pretrained",
        "pretrained all-MiniLM-L6-v2 (6-layer BERT, 22.7M) + new classifier head",
    ),
    "mlp": ("leantrain.models.mlp", "multilayer perceptron on flattened inputs"),
    "resnet20": ("leantrain.models.resnet", "CIFAR-style ResNet (He et al. 2016), option-A shortcuts, depth 6n+2"),
    "smollm2-135m": (
        "leantrain.models.pretrained",
        "pretrained SmolLM2-135M-Instruct (30-layer Llama), dequantised GGUF",
    ),
    "tinygpt": ("leantrain.models.tinygpt", "nanoGPT-style pre-LN causal transformer LM with tied embeddings"),
}
# pretrained model name -> module that registers its tokenizer loader
BUILTIN_TOKENIZERS: dict[str, str] = {
    "minilm": "leantrain.models.pretrained",
    "smollm2-135m": "leantrain.models.pretrained",
}


@dataclasses.dataclass(frozen=True)
class _ModelEntry:
    config_cls: type
    build: Callable[[Any], nn.Module]
    description: str


_MODELS: dict[str, _ModelEntry] = {}
_TOKENIZERS: dict[str, Callable[[], Any]] = {}


def register_model(name: str, config_cls: type, description: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator registering ``build(config) -> nn.Module`` under ``name`` with its config dataclass.

    ``description`` (one line) is required except for the built-in models, whose description is in
    :data:`BUILTIN_MODELS`.
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls for model {name!r} must be a dataclass, got {config_cls!r}")
    if description is None and name not in BUILTIN_MODELS:
        raise TypeError(f"register_model({name!r}, ...) needs a one-line description")

    def decorator(build: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        old = _MODELS.get(name)
        # Re-registering the same function (a module reload) is harmless; a different one is a name clash,
        # also with a built-in model whose module is not imported yet.
        if old is not None and _qualname(old.build) != _qualname(build):
            raise ValueError(f"model {name!r} is already registered by {_qualname(old.build)}")
        if name in BUILTIN_MODELS and build.__module__ != BUILTIN_MODELS[name][0]:
            raise ValueError(f"model {name!r} is already registered by {BUILTIN_MODELS[name][0]}")
        _MODELS[name] = _ModelEntry(config_cls, build, description or BUILTIN_MODELS[name][1])
        return build

    return decorator


def register_tokenizer(name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator registering a zero-argument tokenizer loader for the pretrained model ``name``."""

    def decorator(load: Callable[[], Any]) -> Callable[[], Any]:
        _TOKENIZERS[name] = load
        return load

    return decorator


def _entry(name: str) -> _ModelEntry:
    """The registered entry of ``name``, importing a built-in model's module on first use."""
    if name not in _MODELS and name in BUILTIN_MODELS:
        importlib.import_module(BUILTIN_MODELS[name][0])
    if name not in _MODELS:
        names = sorted(BUILTIN_MODELS.keys() | _MODELS.keys())
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(names)}")
    return _MODELS[name]


def list_models() -> dict[str, str]:
    """Registered model names mapped to their one-line descriptions, sorted by name."""
    descriptions = {name: text for name, (_module, text) in BUILTIN_MODELS.items()}
    descriptions.update({name: entry.description for name, entry in _MODELS.items()})
    return dict(sorted(descriptions.items()))


def model_config_class(name: str) -> type:
    """The config dataclass of model ``name``; ConfigError listing the valid names if unknown."""
    return _entry(name).config_cls


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
    return _entry(name).build(config)


def tokenizer_names() -> list[str]:
    """Names of pretrained models whose tokenizer :func:`load_tokenizer` can load."""
    return sorted(BUILTIN_TOKENIZERS.keys() | _TOKENIZERS.keys())


def load_tokenizer(name: str) -> Any:
    """The Hugging Face tokenizer of a pretrained model ("minilm", "smollm2-135m"); ConfigError otherwise."""
    if name not in _TOKENIZERS and name in BUILTIN_TOKENIZERS:
        importlib.import_module(BUILTIN_TOKENIZERS[name])
    if name not in _TOKENIZERS:
        raise ConfigError(f"model {name!r} has no tokenizer; models with a tokenizer: {', '.join(tokenizer_names())}")
    return _TOKENIZERS[name]()


def _qualname(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"
