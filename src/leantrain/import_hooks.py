"""Register leantrain's extensions of other libraries as soon as those are imported, without importing them.

``import leantrain`` must make ``PeftModel.from_pretrained`` understand our PEFT tuners (GEM, PaCA) and
``AutoModelForCausalLM.from_pretrained`` understand ghosted (depth-pruned and recovered) decoder models, but
importing PEFT or transformers' model code costs seconds, which the CLI and the other methods should not pay.
So for each extended module: if it is already imported we register at once; otherwise a one-shot import hook
registers right after the module's own code has run. A failing registration gives a warning here and a clear
error when the extension is used, never a broken ``import peft`` / ``import transformers``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable

# module -> "leantrain module" whose import registers our extensions of it, or "module:function" to call. The
# ghosted models register when transformers' AutoConfig or Auto model classes load (what from_pretrained of a saved
# folder needs), not with every `import transformers`: registering imports the modeling code of four families.
_GHOSTED = "leantrain.prune.ghosted_models:register"
EXTENSIONS = {
    "peft": "leantrain.finetune.peft_tuners",
    "transformers.models.auto.configuration_auto": _GHOSTED,
    "transformers.models.auto.modeling_auto": _GHOSTED,
    # imports nest (a family's config imports modeling_auto): the family's own modules finishing retry what a nested
    # call had to skip (see leantrain.prune.ghosted_models.register)
    **{
        f"transformers.models.{family}.{part}_{family}": _GHOSTED
        for family in ("llama", "mistral", "qwen2", "qwen3")
        for part in ("configuration", "modeling")
    },
}


def _register(library: str) -> None:
    from leantrain.errors import LeantrainError

    try:
        module, _, function = EXTENSIONS[library].partition(":")
        registered = importlib.import_module(module)  # registers on import, or:
        if function:
            getattr(registered, function)()
    except LeantrainError as err:
        warnings.warn(f"leantrain's {library} extensions are not registered: {err}", stacklevel=2)
    except Exception as err:  # an unsupported version whose classes changed: never break the library's import
        warnings.warn(
            f"leantrain's {library} extensions are not registered ({type(err).__name__}: {err})", stacklevel=2
        )


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, after: Callable[[], None]):
        self.inner, self.after = inner, after

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def __getattr__(self, name: str):  # resource readers, is_package, ...: the real loader's
        return getattr(self.inner, name)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        self.after()


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, library: str):
        self.library = library

    def find_spec(self, fullname, path, target=None):
        if fullname != self.library:
            return None
        sys.meta_path.remove(self)  # one shot; also lets find_spec below see the real finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, lambda: _register(self.library))
        return spec


def install() -> None:
    """For every extended library: register now if it is loaded, else when it is first imported (idempotent)."""
    for library in EXTENSIONS:
        if library in sys.modules:
            _register(library)
        elif not any(isinstance(f, _Finder) and f.library == library for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder(library))
