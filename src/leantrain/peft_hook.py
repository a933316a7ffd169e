"""Register leantrain's PEFT tuners (GEM, PaCA) as soon as PEFT is imported, without importing it ourselves.

``import leantrain`` must make ``PeftModel.from_pretrained`` understand our adapters, but importing PEFT
costs seconds (transformers, torch.distributed), which the CLI and the non-PEFT methods should not pay. So
if PEFT is already imported we register at once; otherwise a one-shot import hook registers right after
PEFT's own ``__init__`` has run. A PEFT version we do not support gives a warning here and a clear error
when a tuner is used, never a broken ``import peft``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings


def _register() -> None:
    from leantrain.errors import LeantrainError

    try:
        import leantrain.finetune.peft_tuners  # noqa: F401  (registers on import)
    except LeantrainError as err:
        warnings.warn(f"leantrain's PEFT tuners are not registered: {err}", stacklevel=2)
    except Exception as err:  # an unsupported PEFT whose classes changed: never break `import peft` itself
        warnings.warn(f"leantrain's PEFT tuners are not registered ({type(err).__name__}: {err})", stacklevel=2)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def __getattr__(self, name: str):  # resource readers, is_package, ...: the real loader's
        return getattr(self.inner, name)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        _register()


class _PeftFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one shot; also lets find_spec below see the real finders
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register now if PEFT is loaded, else when it is first imported (idempotent)."""
    if "peft" in sys.modules:
        _register()
    elif not any(isinstance(f, _PeftFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftFinder())
