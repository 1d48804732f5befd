"""Errors for bad input: one line naming the file, key, value and what is expected (exit code 2)."""


class InputError(ValueError):
    """Bad input, raised before (or instead of) the work it would spoil."""


class ConfigError(InputError):
    """An invalid config, recipe, scheme or command-line value."""


class CheckpointError(InputError):
    """A damaged checkpoint, or one that does not hold what its args or the caller say."""
