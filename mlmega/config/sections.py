"""One config section (a YAML mapping) into its typed dataclass, refusing unknown keys."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mlmega.config.errors import ConfigError


def section_from_mapping(cls, data: Any, source: str):
    """``cls(**data)`` with lists as tuples (frozen dataclasses); errors name ``source``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known: {sorted(fields)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None
