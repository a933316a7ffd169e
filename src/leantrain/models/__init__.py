"""Model zoo: a registry of small from-scratch models and offline pretrained ones.

Importing this package registers every model; use :func:`build_model` with a name from
:func:`list_models` and keyword overrides of that model's config dataclass.
"""

from leantrain.models import cnn, lstm, mlp, pretrained, resnet, tinygpt  # noqa: F401  (registers the models)
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
