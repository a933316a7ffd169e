"""Which modules leantrain's PEFT tuners adapt by default, and which modules a wrapped model leaves untrained.

**Default targets.** When a config's ``target_modules`` is None, GEM and PaCA adapt the same layers LoRA does: PEFT's
own per-architecture table (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, looked up by the Hugging Face
``config.model_type``), e.g. ``query``/``value`` for BERT (MiniLM) and ``q_proj``/``v_proj`` for Llama (SmolLM2).
Using PEFT's table rather than one of our own keeps the three methods comparable and follows PEFT when it adds
architectures. Departure from the PaCA paper: its README example targets every projection of a decoder block; pass
``target_modules="all-linear"`` (or the list) for that.

**Frozen new head.** ``AutoModelForSequenceClassification.from_pretrained`` (and leantrain's ``minilm``) builds a
classification head that is not in the checkpoint. A PEFT method freezes every non-adapter weight, so unless the head
is in ``modules_to_save`` (or ``task_type="SEQ_CLS"`` puts it there) it keeps its random weights and accuracy suffers
silently. :func:`warn_frozen_new_modules` warns about that; every tuner registered through
:func:`leantrain.finetune.peft_tuners.registration.register_tuner` calls it right after injection. It recognises new
weights by transformers' per-parameter loading flag (``_is_hf_initialized``, set on every weight read from the
checkpoint by transformers 5); models not loaded that way (built from a config, or older transformers) are not
checked.
"""

from __future__ import annotations

import warnings

from torch import nn

__all__ = ["default_target_modules", "frozen_new_modules", "warn_frozen_new_modules"]

_LOADED_FLAG = "_is_hf_initialized"  # transformers marks each parameter it read from the checkpoint


def default_target_modules(model_type: str | None) -> list[str] | None:
    """PEFT's LoRA default targets for a Hugging Face ``model_type`` (e.g. "bert", "llama"); None if unknown."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_TARGETS

    targets = LORA_TARGETS.get(model_type) if model_type else None
    return list(targets) if targets is not None else None


def default_target_mapping() -> dict[str, list[str]]:
    """The whole table (model_type -> module names), in the form ``BaseTuner.target_module_mapping`` expects."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_TARGETS

    return LORA_TARGETS


def frozen_new_modules(model: nn.Module) -> list[str]:
    """Names of modules with weights that were newly initialised at load time and are neither trainable nor saved.

    ``model`` is a model after PEFT injection (a ``PeftModel`` or the tuner's wrapped model). Adapter weights and
    ``modules_to_save`` wrappers (which hold a trainable copy) do not count. Returns [] for a model that was not
    loaded by transformers' ``from_pretrained`` (no parameter carries the loading flag).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if not any(getattr(p, _LOADED_FLAG, False) for p in model.parameters()):
        return []
    covered: set[int] = set()
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save / trainable tokens: a trained copy
            covered.update(id(p) for p in module.parameters())
        elif isinstance(module, BaseTunerLayer):  # the adapter's own weights are new by design
            base = {id(p) for p in module.get_base_layer().parameters()}
            covered.update(id(p) for p in module.parameters() if id(p) not in base)
    names: list[str] = []
    for name, p in model.named_parameters():
        if p.requires_grad or id(p) in covered or getattr(p, _LOADED_FLAG, False):
            continue
        owner = name.rsplit(".", 1)[0].removeprefix("base_model.model.")
        if owner not in names:
            names.append(owner)
    return names


def warn_frozen_new_modules(model: nn.Module, config=None) -> list[str]:
    """Warn (once per call) if :func:`frozen_new_modules` finds any; returns their names. Skipped in inference mode."""
    if config is not None and getattr(config, "inference_mode", False):
        return []
    names = frozen_new_modules(model)
    if names:
        method = getattr(getattr(config, "peft_type", None), "value", "the PEFT method")
        warnings.warn(
            f"{', '.join(names)}: newly initialised (not in the pretrained checkpoint) but frozen by {method}, so it "
            f"keeps its random weights; pass modules_to_save={names!r} (or task_type='SEQ_CLS') in the config",
            UserWarning,
            stacklevel=2,
        )
    return names
