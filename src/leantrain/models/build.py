"""A recipe's model: the registry's builder with the recipe's options and the data-dependent fields filled in."""

from __future__ import annotations

from torch import nn


def build_model_for_data(name: str, options: dict, data_fields: dict) -> nn.Module:
    """Build model ``name`` with ``options``; data-dependent fields (input_shape, num_classes, vocab_size, ...) that
    the model's config declares and ``options`` leaves unset come from ``data_fields``."""
    from leantrain.models import build_model, model_config_class

    names = set(model_config_class(name).__dataclass_fields__)
    kwargs = {k: v for k, v in data_fields.items() if k in names and v is not None}
    kwargs.update(options)
    return build_model(name, **kwargs)
