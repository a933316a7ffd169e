"""leantrain: resource-efficient and robust learning on plain PyTorch."""

from leantrain import import_hooks
from leantrain.errors import ConfigError, LeantrainError, MissingDependencyError, NonFiniteLossError

__version__ = "0.1.0"

__all__ = ["ConfigError", "LeantrainError", "MissingDependencyError", "NonFiniteLossError", "__version__"]

import_hooks.install()  # PEFT tuners and ghosted HF models register once (and only if) peft / transformers load
