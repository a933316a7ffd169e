"""Ghosted Hugging Face models in leantrain: converting a recovered model, and registering the classes with the Auto
API.

The classes themselves live in the standalone :mod:`~leantrain.prune.configuration_ghosted` and
:mod:`~leantrain.prune.modeling_ghosted` (torch and transformers only), which a ghosted model's ``save_pretrained``
copies into its folder beside an ``auto_map``: the folder then loads anywhere with ``trust_remote_code=True``. With
leantrain imported the same classes are registered locally (:mod:`leantrain.import_hooks`) with ``AutoConfig`` and
``AutoModelForCausalLM`` as soon as transformers' Auto API loads, so ``from_pretrained(folder)`` needs no remote code.
Loading such a folder as a plain model of its family fails (its weights are ``model.ghosted.safetensors``) instead of
silently dropping the operators.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.prune.configuration_ghosted import FAMILIES, PREFIX, ghosted_config_class
from leantrain.prune.modeling_ghosted import ghosted_model_class


def ghosted_classes(family: str) -> tuple[type, type]:
    """(config class, causal-LM class) of the ghosted variant of ``family``, registered with the Auto API."""
    if family not in FAMILIES:
        raise ConfigError(
            f"Ghosted Layers save/load supports {', '.join(FAMILIES)} models, not model_type {family!r}; "
            "the recovered model still runs, but save it with torch.save of its state_dict"
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    config_cls, model_cls = ghosted_config_class(family), ghosted_model_class(family)
    AutoConfig.register(PREFIX + family, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    return config_cls, model_cls


_registering = False
_registered: set[str] = set()


def register() -> None:
    """Register every ghosted config and causal-LM class with the Auto API (imports the families' modeling code).

    Called by import hooks (:data:`leantrain.import_hooks.EXTENSIONS`) when transformers' Auto API or a supported
    family's configuration or modeling module loads. Those imports nest (a family's config class imports
    ``modeling_auto`` for its docstrings), so a call made while a family's module is still half-initialised skips
    that family quietly, and a later hook, at the latest the one fired when that module finishes, registers it.
    """
    global _registering
    if _registering or len(_registered) == len(FAMILIES):
        return
    _registering = True
    try:
        for family in FAMILIES:
            if family in _registered:
                continue
            if importlib.util.find_spec(f"transformers.models.{family}") is None:
                _registered.add(family)  # a transformers without that family: nothing to register, ever
                continue
            try:
                ghosted_classes(family)
            except (ImportError, AttributeError):  # its module is mid-import: a later hook registers it
                continue
            _registered.add(family)
    finally:
        _registering = False


def as_ghosted_model(model: nn.Module, placement: dict[str, str]) -> nn.Module:
    """A ghosted-class model with ``model``'s weights (operators included) and ``placement`` in its config."""
    family = model.config.model_type.removeprefix(PREFIX)
    config_cls, model_cls = ghosted_classes(family)
    raw = model.config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        raw.pop(key, None)
    raw["ghost_placement"] = {**(raw.get("ghost_placement") or {}), **placement}
    config = config_cls(**raw)
    config.architectures = [model_cls.__name__]
    with torch.device("meta"):
        ghosted = model_cls(config)
    ghosted.load_state_dict(model.state_dict(), strict=True, assign=True)
    buffers = dict(model.named_buffers())
    for name, buffer in list(ghosted.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (rotary inv_freq) are not in the state dict
            owner, _, leaf = name.rpartition(".")
            ghosted.get_submodule(owner).register_buffer(leaf, buffers[name], persistent=False)
    if getattr(config, "tie_word_embeddings", False):
        ghosted.tie_weights()
    return ghosted.train(model.training)
