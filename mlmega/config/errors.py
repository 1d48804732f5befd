"""The one error type for invalid user input (configs, schemes, checkpoints)."""


class ConfigError(ValueError):
    """Invalid input, raised before any work starts; the message names the source, key and expected value."""
