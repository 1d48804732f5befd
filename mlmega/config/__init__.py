"""Typed configuration: the model description and its loaders."""

from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig

__all__ = ["ConfigError", "ModelConfig"]
