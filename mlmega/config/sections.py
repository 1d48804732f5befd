"""Config sections: typed dataclasses whose fields carry their allowed values, checked in one place.

A field says what it allows with ``checked(default, ge=..., gt=..., le=..., lt=..., choices=...,
pattern=...)``; its annotation says its type (``int``, ``float``, ``str``, ``bool``, ``Optional[X]``,
``tuple[X, ...]``, a mapping). :func:`check_fields` checks every such field of an instance and raises
one :class:`ConfigError` line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from mlmega.config.errors import ConfigError

_CHECK = "mlmega.check"


@dataclass(frozen=True)
class Allowed:
    """The values a field allows besides its type: bounds, a fixed set, or a regular expression."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    choices: Optional[tuple] = None
    pattern: Optional[str] = None
    pattern_text: str = ""  # how the pattern reads in an error message

    def holds(self, value: Any) -> bool:
        if self.choices is not None and value not in self.choices:
            return False
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        if self.pattern is not None:
            return self.pattern_text or f"text matching {self.pattern}"
        low, high = (self.ge, "[") if self.ge is not None else (self.gt, "(")
        top, end = (self.le, "]") if self.le is not None else (self.lt, ")")
        if low is not None and top is not None:
            return f"in {high}{_num(low)}, {_num(top)}{end}"
        return " ".join(f"{op} {_num(v)}" for op, v in ((">=", self.ge), (">", self.gt),
                                                        ("<=", self.le), ("<", self.lt))
                        if v is not None)


def checked(default: Any = dataclasses.MISSING, **allowed: Any) -> Any:
    """A dataclass field whose values must satisfy ``Allowed(**allowed)`` (see the module doc)."""
    return dataclasses.field(default=default, metadata={_CHECK: Allowed(**allowed)})


def check_fields(obj: Any, where: str) -> None:
    """Check every field of the dataclass ``obj`` against its type and ``checked`` bounds; the
    error reads ``WHERE.KEY=VALUE: expected ...`` (``where``: the file and the section, e.g.
    ``recipe.yaml: schedule``; ``recipe.yaml:`` for top-level keys)."""
    hints = _hints(type(obj))
    sep = " " if where.endswith(":") else "."
    for f in dataclasses.fields(obj):
        if f.name == "source" or f.name not in hints:
            continue
        allowed = f.metadata.get(_CHECK, Allowed())
        value = getattr(obj, f.name)
        problem = _problem(value, hints[f.name], allowed)
        if problem:
            raise ConfigError(f"{where}{sep}{f.name}={_show(value)}: expected {problem}")


def _problem(value: Any, kind: Any, allowed: Allowed) -> Optional[str]:
    """What is wrong with ``value`` for a field of type ``kind`` (None when nothing is)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        item = args[0]
        what = f"a list of {_kind_text(item, allowed, plural=True)}"
        if not isinstance(value, (tuple, list)):
            return what
        for element in value:
            if _problem(element, item, allowed):
                return what
        return None
    if origin in (dict, collections.abc.Mapping) or kind is dict:
        return None if isinstance(value, Mapping) else "a mapping of NAME: value"
    if not isinstance(kind, type) or dataclasses.is_dataclass(kind):
        return None  # nested sections check themselves
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          if kind is float else isinstance(value, kind))
    if not ok or not allowed.holds(value):
        return _kind_text(kind, allowed)
    return None


def _kind_text(kind: Any, allowed: Allowed, plural: bool = False) -> str:
    base = ({int: "integers", float: "numbers", str: "strings", bool: "booleans"} if plural
            else {int: "an integer", float: "a number", str: "a string",
                  bool: "true or false"})
    text = base.get(kind, getattr(kind, "__name__", str(kind)))
    bounds = allowed.describe()
    if allowed.choices is not None or allowed.pattern is not None:
        return bounds
    return f"{text} {bounds}" if bounds else text


def _num(value: float) -> str:
    return f"{value:g}"


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return repr(value)


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def section_from_mapping(cls, data: Any, source: str):
    """``cls(**data)`` with lists as tuples (frozen dataclasses), every field checked
    (:func:`check_fields`); errors name ``source`` (the file and the section)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known: {sorted(fields)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        section = cls(**values)
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None
    check_fields(section, source)
    return section
