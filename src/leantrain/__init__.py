"""leantrain: resource-efficient and robust learning on plain PyTorch."""

from leantrain.errors import ConfigError, LeantrainError, MissingDependencyError, NonFiniteLossError

__version__ = "0.1.0"

__all__ = ["ConfigError", "LeantrainError", "MissingDependencyError", "NonFiniteLossError", "__version__"]
