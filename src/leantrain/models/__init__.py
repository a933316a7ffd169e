"""Model zoo: a registry of small from-scratch models and offline pretrained ones.

Use :func:`build_model` with a name from :func:`list_models` and keyword overrides of that model's config
dataclass. A built-in model's module (torch, for the pretrained ones transformers) is imported when the model is
first used, not with this package: listing names costs nothing.
"""

from leantrain.models.registry import (
    build_model,
    list_models,
    load_tokenizer,
    make_model_config,
    model_config_class,
    register_model,
    tokenizer_names,
)

__all__ = [
    "build_model",
    "list_models",
    "load_tokenizer",
    "make_model_config",
    "model_config_class",
    "register_model",
    "tokenizer_names",
]
