"""Ghosted Hugging Face model classes: decoder models carrying Ghosted Layers operators that round-trip through
``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained``.

For each supported family (Llama, Mistral, Qwen2, Qwen3) a config subclass with ``model_type =
"leantrain_ghosted_<family>"`` records where the operators sit (``ghost_placement``: {block index: "pre" |
"post"}), and a model subclass attaches them at construction, so loading restores the operators with the other
weights. ``import leantrain`` registers the classes with the Auto API as soon as transformers is imported
(:mod:`leantrain.import_hooks`); without leantrain such a folder fails to load with transformers' "unrecognized
model type" error instead of silently loading a model without its operators.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.prune.ghost_operator import attach_ghosts

PREFIX = "leantrain_ghosted_"
FAMILIES = {
    "llama": ("transformers.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("transformers.models.mistral", "MistralConfig", "MistralForCausalLM"),
    "qwen2": ("transformers.models.qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("transformers.models.qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
}
_CLASSES: dict[str, tuple[type, type]] = {}


def ghosted_classes(family: str) -> tuple[type, type]:
    """(config class, causal-LM class) of the ghosted variant of ``family``, registered with the Auto API."""
    if family in _CLASSES:
        return _CLASSES[family]
    if family not in FAMILIES:
        raise ConfigError(
            f"Ghosted Layers save/load supports {', '.join(FAMILIES)} models, not model_type {family!r}; "
            "the recovered model still runs, but save it with torch.save of its state_dict"
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    module_name, config_name, model_name = FAMILIES[family]
    module = importlib.import_module(module_name)
    base_config, base_model = getattr(module, config_name), getattr(module, model_name)
    config_cls = type(f"Ghosted{config_name}", (base_config,), {"model_type": PREFIX + family})

    def __init__(self, config):
        base_model.__init__(self, config)
        attach_ghosts(self, dict(getattr(config, "ghost_placement", None) or {}))

    model_cls = type(f"Ghosted{model_name}", (base_model,), {"config_class": config_cls, "__init__": __init__})
    AutoConfig.register(PREFIX + family, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    _CLASSES[family] = (config_cls, model_cls)
    return _CLASSES[family]


def as_ghosted_model(model: nn.Module, placement: dict[str, str]) -> nn.Module:
    """A ghosted-class model with ``model``'s weights (operators included) and ``placement`` in its config."""
    family = model.config.model_type.removeprefix(PREFIX)
    config_cls, model_cls = ghosted_classes(family)
    raw = model.config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
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


for _family in FAMILIES:  # registered when transformers is imported (see leantrain.import_hooks)
    try:
        ghosted_classes(_family)
    except (ImportError, AttributeError):  # a transformers without that family
        pass
