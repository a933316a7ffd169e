"""Ghosted decoder models: depth-pruned Llama / Mistral / Qwen2 / Qwen3 causal LMs carrying Ghosted Layers operators
(written by leantrain, https://arxiv.org/abs/2605.15491 for the method).

Standalone on purpose (torch and transformers only, plus ``configuration_ghosted.py`` beside it): both files are
copied into every saved ghosted model folder and named in its ``auto_map``, so the folder loads where leantrain is not
installed::

    from transformers import AutoModelForCausalLM, pipeline
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    generate = pipeline("text-generation", model=folder, trust_remote_code=True)

A gap left by removed blocks gets one linear operator h <- h W, held by the block after the gap (applied to its
input, ``"pre"``) or, for a gap at the very end, by the last surviving block (applied to its output, ``"post"``).
The operators are ordinary ``nn.Linear`` weights of the model, so they follow ``.to(dtype)`` and save with it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import transformers
from torch import nn

from .configuration_ghosted import FAMILIES, PREFIX, WEIGHTS_VARIANT, config_class_name, ghosted_config_class

_MODELS: dict[str, type] = {}
CODE_FILES = ("configuration_ghosted.py", "modeling_ghosted.py")


class GhostOperator(nn.Module):
    """h -> h @ W for hidden states (..., C); holds ``linear.weight`` = Wᵀ, computed in the weight's dtype."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, bias=False, dtype=torch.float32)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(hidden_size))

    def set_operator(self, w: torch.Tensor) -> GhostOperator:
        with torch.no_grad():
            self.linear.weight.copy_(w.T.to(self.linear.weight.dtype))
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h.to(self.linear.weight.dtype)).to(h.dtype)


def _pre_hook(layer: nn.Module, args: tuple, kwargs: dict):
    if args:
        return (layer.ghost_pre(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": layer.ghost_pre(kwargs["hidden_states"])}


def _post_hook(layer: nn.Module, _args, output):
    if isinstance(output, tuple):
        return (layer.ghost_post(output[0]), *output[1:])
    return layer.ghost_post(output)


def attach_ghosts(model: nn.Module, placement: dict) -> None:
    """Give the blocks named in ``placement`` ({block index: "pre" | "post"}) identity operators and their hooks."""
    layers = model.model.layers
    hidden = model.config.hidden_size
    for key, where in placement.items():
        if where not in ("pre", "post"):
            raise ValueError(f"ghost placement {where!r} for layer {key} must be 'pre' or 'post'")
        layer = layers[int(key)]
        name = f"ghost_{where}"
        if hasattr(layer, name):
            continue
        layer.add_module(name, GhostOperator(hidden))
        if where == "pre":
            layer.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        else:
            layer.register_forward_hook(_post_hook)


def _variant_for(path, kwargs: dict) -> dict:
    """``variant=ghosted`` unless given, or unless ``path`` is a folder saved without it (an older leantrain)."""
    if "variant" in kwargs:
        return kwargs
    folder = Path(path) if isinstance(path, str | os.PathLike) else None
    if folder is not None and folder.is_dir() and not any(folder.glob(f"model.{WEIGHTS_VARIANT}.safetensors*")):
        return kwargs
    return {**kwargs, "variant": WEIGHTS_VARIANT}


def ghosted_model_class(family: str) -> type:
    """The ghosted causal-LM class of ``family`` (made once; ``AttributeError`` if transformers lacks it)."""
    if family in _MODELS:
        return _MODELS[family]
    base = getattr(transformers, FAMILIES[family][1])
    config_cls = ghosted_config_class(family)
    auto_map = {"AutoConfig": f"configuration_ghosted.{config_class_name(family)}",
                "AutoModelForCausalLM": f"modeling_ghosted.{model_class_name(family)}"}  # fmt: skip

    class Ghosted(base):
        config_class = config_cls

        def __init__(self, config):
            super().__init__(config)
            attach_ghosts(self, dict(getattr(config, "ghost_placement", None) or {}))

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
            kwargs = _variant_for(pretrained_model_name_or_path, kwargs)
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

        def save_pretrained(self, save_directory, *args, **kwargs):
            """The family's ``save_pretrained`` (weights as ``model.ghosted.safetensors``), plus this code and an
            ``auto_map`` so that the folder loads with ``trust_remote_code=True`` without leantrain."""
            kwargs.setdefault("variant", WEIGHTS_VARIANT)
            self.config.auto_map = dict(auto_map)
            out = super().save_pretrained(save_directory, *args, **kwargs)
            here = Path(__file__).parent
            for name in CODE_FILES:
                shutil.copyfile(here / name, Path(save_directory) / name)
            return out

    Ghosted.__name__ = Ghosted.__qualname__ = model_class_name(family)
    Ghosted.__module__ = __name__
    _MODELS[family] = Ghosted
    return Ghosted


def model_class_name(family: str) -> str:
    return "Ghosted" + FAMILIES[family][1]


def __getattr__(name: str) -> type:  # GhostedLlamaForCausalLM, ... made on first access (auto_map's getattr)
    for family in FAMILIES:
        if name == model_class_name(family):
            return ghosted_model_class(family)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PREFIX", "GhostOperator", "attach_ghosts", "ghosted_model_class", "ghosted_config_class"]
