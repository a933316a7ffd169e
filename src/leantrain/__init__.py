"""leantrain: resource-efficient and robust learning on plain PyTorch."""

from leantrain import peft_hook  # noqa: F401  (enabled below once the tuners land)
from leantrain.errors import ConfigError, LeantrainError, MissingDependencyError, NonFiniteLossError

__version__ = "0.1.0"

__all__ = ["ConfigError", "LeantrainError", "MissingDependencyError", "NonFiniteLossError", "__version__"]

# peft_hook.install()  # enabled once the tuners land
