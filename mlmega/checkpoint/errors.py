"""The error type for damaged or unsafe checkpoints (the CLI prints it as one line, exit code 2)."""

from mlmega.config.errors import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or written as it is: damaged bytes, inconsistent ranks, a
    refused pickle global, a full disk. The message names the file, what was found and expected."""
