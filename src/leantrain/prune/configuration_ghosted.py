"""Configurations of ghosted decoder models: depth-pruned Llama / Mistral / Qwen2 / Qwen3 models carrying Ghosted
Layers operators (written by leantrain, https://arxiv.org/abs/2605.15491 for the method).

Standalone on purpose: this file and ``modeling_ghosted.py`` are copied into every saved ghosted model folder and
named in its ``config.json`` ``auto_map``, so that ::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads the model, operators included, where leantrain is not installed. Keep it free of leantrain imports: torch and
transformers only.

A ghosted config is its family's config plus ``ghost_placement`` ({block index: "pre" | "post"}: the operator acts
on that block's input or, for a gap at the very end, on the last block's output), under ``model_type =
"leantrain_ghosted_<family>"``.
"""

from __future__ import annotations

import transformers

PREFIX = "leantrain_ghosted_"
# The weights are saved as model.<variant>.safetensors, so that loading the folder as a plain model of the family
# (``LlamaForCausalLM.from_pretrained``), which would silently drop the operators, fails with "no file named
# model.safetensors" instead. The ghosted classes read and write this variant by default.
WEIGHTS_VARIANT = "ghosted"
# family -> (config class, causal-LM class) names in transformers
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
_CONFIGS: dict[str, type] = {}


def config_class_name(family: str) -> str:
    return "Ghosted" + FAMILIES[family][0]


def ghosted_config_class(family: str) -> type:
    """The ghosted config class of ``family`` (made once; ``AttributeError`` if transformers lacks the family)."""
    if family not in _CONFIGS:
        base = getattr(transformers, FAMILIES[family][0])
        _CONFIGS[family] = type(config_class_name(family), (base,), {"model_type": PREFIX + family,
                                                                     "__module__": __name__})  # fmt: skip
    return _CONFIGS[family]


def __getattr__(name: str) -> type:  # GhostedLlamaConfig, ... made on first access (auto_map's getattr)
    for family in FAMILIES:
        if name == config_class_name(family):
            return ghosted_config_class(family)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
