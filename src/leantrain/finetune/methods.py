"""Fine-tuning methods by name, for recipes: ``full``, ``lora`` (PEFT's LoRA), ``gem`` and ``paca``.

A recipe's ``finetune`` section names the method and gives the keyword arguments of its config class
(``peft.LoraConfig``, :class:`GemConfig`, :class:`PacaConfig`). :func:`apply_method` turns a freshly built
model into the model to train. PEFT is imported only for methods that need it.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Callable, Iterable

from torch import nn

from leantrain.errors import ConfigError, MissingDependencyError

# The registry recipes, the config and the tests iterate: name -> (module, config class), None for ``full``.
METHODS: dict[str, tuple[str, str] | None] = {
    "full": None,
    "lora": ("peft", "LoraConfig"),
    "gem": ("leantrain.finetune.peft_tuners.gem", "GemConfig"),
    "paca": ("leantrain.finetune.peft_tuners.paca", "PacaConfig"),
}


def method_config_class(method: str) -> type | None:
    """The config dataclass of a PEFT method, or None for ``full``."""
    if method not in METHODS:
        raise ConfigError(f"unknown fine-tuning method {method!r}; choose from: {', '.join(METHODS)}")
    if METHODS[method] is None:
        return None
    module, name = METHODS[method]
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "peft":
            raise
        raise MissingDependencyError("peft", 'pip install -c constraints.txt "leantrain[peft]"') from None


def make_method_config(method: str, options: dict):
    """Validate ``options`` by building the method's config (None for ``full``, which takes no options)."""
    cls = method_config_class(method)
    if cls is None:
        if options:
            raise ConfigError(f"finetune.method=full takes no options; got {', '.join(sorted(options))}")
        return None
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for finetune.method={method}; see {cls.__name__}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"finetune ({method}): {err}") from None


def apply_method(
    model: nn.Module,
    method: str,
    options: dict,
    score_batches: Iterable[dict] | None = None,
    loss_fn: Callable | None = None,
) -> nn.Module:
    """Return the model to train: unchanged for ``full``, else wrapped by the PEFT method."""
    config = make_method_config(method, options)
    if config is None:
        return model
    with warnings.catch_warnings():
        # PEFT reads a transformers attribute that transformers 5 deprecates; nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if method == "gem":
            from leantrain.finetune.peft_tuners.gem import apply_gem

            if score_batches is None:
                raise ConfigError("finetune.method=gem needs training batches for its gradient pass")
            return apply_gem(model, score_batches, config, loss_fn=loss_fn)
        import peft

        from leantrain.finetune.target_modules import warn_frozen_new_modules

        peft_model = peft.get_peft_model(model, config)
        warn_frozen_new_modules(peft_model, config)
        return peft_model
