"""leantrain: resource-efficient and robust learning on plain PyTorch."""

from leantrain import peft_hook
from leantrain.errors import ConfigError, LeantrainError, MissingDependencyError, NonFiniteLossError

__version__ = "0.1.0"

__all__ = ["ConfigError", "LeantrainError", "MissingDependencyError", "NonFiniteLossError", "__version__"]

peft_hook.install()  # GEM and PaCA become PEFT methods once (and only if) peft is imported
