"""Registering leantrain's tuners with Hugging Face PEFT (an out-of-tree extension).

PEFT's ``register_peft_method`` only accepts names already in its closed ``PeftType`` enum, so a third-party
tuner needs the enum extended at run time. This module does that for the PEFT minor versions it was checked
against (the enum internals it touches are private) and refuses others with a clear error, rather than
half-registering. After registration, ``get_peft_model``, ``save_pretrained``, ``PeftModel.from_pretrained``
and ``merge_and_unload`` work with our configs as with PEFT's own tuners.

Registration also gives each tuner PEFT's post-injection hook a check that warns when a newly initialised head
(e.g. a fresh ``classifier``) would stay frozen (:func:`leantrain.finetune.target_modules.warn_frozen_new_modules`).
"""

from __future__ import annotations

from leantrain.errors import LeantrainError, MissingDependencyError

SUPPORTED_PEFT = ("0.21.",)  # minor versions whose PeftType / mapping internals this shim was tested on


def _peft():
    try:
        import peft
    except ImportError:
        raise MissingDependencyError("peft", 'pip install "leantrain[peft]" (peft 0.21.x)') from None
    if not peft.__version__.startswith(SUPPORTED_PEFT):
        raise LeantrainError(
            f"leantrain's PEFT tuners support peft {', '.join(v + 'x' for v in SUPPORTED_PEFT)}; "
            f"found peft {peft.__version__}. Install a supported one: pip install 'peft>=0.21,<0.22'"
        )
    return peft


def add_peft_type(name: str):
    """Add ``name.upper()`` to ``peft.utils.PeftType`` (idempotent) and return the member."""
    from peft.utils.peft_types import PeftType

    key = name.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    member = str.__new__(PeftType, key)
    member._name_, member._value_ = key, key
    member.__objclass__ = PeftType
    member.__init__()
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    type.__setattr__(PeftType, key, member)
    return member


def register_tuner(name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Make ``config_cls``/``model_cls`` a PEFT method called ``name`` (idempotent)."""
    _peft()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    peft_type = add_peft_type(name)
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls:
        return
    _add_new_head_check(model_cls)
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)


def _add_new_head_check(model_cls: type) -> None:
    """Run :func:`warn_frozen_new_modules` after the tuner's own ``_post_injection_hook`` (idempotent).

    PEFT calls ``_post_injection_hook`` once the adapter layers and ``modules_to_save`` wrappers are in place, which
    is the first moment it is known whether a new head is trained.
    """
    own_hook = model_cls._post_injection_hook
    if getattr(own_hook, "_checks_new_heads", False):
        return

    def _post_injection_hook(self, model, config, adapter_name: str) -> None:
        from leantrain.finetune.target_modules import warn_frozen_new_modules

        own_hook(self, model, config, adapter_name)
        warn_frozen_new_modules(model, config)

    _post_injection_hook._checks_new_heads = True
    model_cls._post_injection_hook = _post_injection_hook
