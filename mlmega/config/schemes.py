"""Coalescing schemes: which large units (heads/query groups, or layers) merge into each small one.

A scheme is written as ``{kind: adjacent|stacked, factor: K}`` or as explicit groups
``[[0, 6], [1, 7], ...]`` (mlmega YAML), or as the reference implementation's JSON
``{"width_scheme": [[...]], "depth_scheme": [[...]]}``. Resolved against a model it becomes a
:class:`Grouping`: a validated partition of the large model's units into ordered groups.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import yaml

from mlmega.config.errors import ConfigError

KINDS = ("adjacent", "stacked", "custom")


@dataclass(frozen=True)
class Grouping:
    """A partition of ``range(size)`` large units into ``len(groups)`` small units."""

    groups: tuple[tuple[int, ...], ...]
    size: int

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def average_matrix(self) -> torch.Tensor:
        """F (small x large): row i averages the members of group i (row-stochastic)."""
        f = torch.zeros(self.num_groups, self.size, dtype=torch.float64)
        for i, group in enumerate(self.groups):
            f[i, list(group)] = 1.0 / len(group)
        return f

    def copy_matrix(self) -> torch.Tensor:
        """T = rownorm(F^T) (large x small): row j copies the small unit of j's group (0/1)."""
        return (self.average_matrix().T > 0).to(torch.float64)

    def group_of(self, unit: int) -> int:
        return next(i for i, group in enumerate(self.groups) if unit in group)


@dataclass(frozen=True)
class SchemeSpec:
    """A scheme as written in a config: a named kind with a factor, or explicit groups."""

    kind: str
    factor: Optional[int] = None
    groups: Optional[tuple[tuple[int, ...], ...]] = None
    source: str = field(default="<scheme>", compare=False)

    @classmethod
    def parse(cls, value: Any, source: str) -> "SchemeSpec":
        """From ``{kind, factor}``, ``{groups: [[..]]}``, a bare list of groups, or a kind name."""
        if isinstance(value, str):
            value = {"kind": value, "factor": 2}
        if isinstance(value, (list, tuple)):
            value = {"groups": value}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: expected a mapping {{kind, factor}} or a list of groups, "
                              f"got {value!r}")
        unknown = sorted(set(value) - {"kind", "factor", "groups"})
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; expected kind, factor, groups")
        if "groups" in value:
            groups = value["groups"]
            if (not isinstance(groups, (list, tuple)) or not groups
                    or not all(isinstance(g, (list, tuple)) and g for g in groups)):
                raise ConfigError(f"{source}: groups must be a non-empty list of non-empty lists")
            for g in groups:
                for unit in g:
                    if not isinstance(unit, int) or isinstance(unit, bool):
                        raise ConfigError(f"{source}: group member {unit!r} is not an integer")
            return cls("custom", None, tuple(tuple(g) for g in groups), source)
        kind, factor = value.get("kind"), value.get("factor", 2)
        if kind not in KINDS[:2]:
            raise ConfigError(f"{source}: kind={kind!r}: expected one of {KINDS[:2]} "
                              f"(or explicit groups)")
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2:
            raise ConfigError(f"{source}: factor={factor!r}: expected an integer >= 2")
        return cls(kind, factor, None, source)

    def resolve(self, size: int, what: str) -> Grouping:
        """The grouping of a large model with ``size`` units (``what`` names them in errors)."""
        if self.kind == "custom":
            return _validated(self.groups, size, what, self.source)
        if size % self.factor:
            raise ConfigError(f"{self.source}: {what}={size} is not divisible by the "
                              f"{self.kind} factor {self.factor}")
        count = size // self.factor
        if self.kind == "adjacent":
            groups = [tuple(range(i * self.factor, (i + 1) * self.factor)) for i in range(count)]
        else:
            groups = [tuple(i + k * count for k in range(self.factor)) for i in range(count)]
        return Grouping(tuple(groups), size)

    def resolve_from_small(self, count: int, what: str) -> Grouping:
        """The grouping that de-coalesces a small model with ``count`` units."""
        if self.kind == "custom":
            grouping = self.resolve(sum(len(g) for g in self.groups), what)
            if grouping.num_groups != count:
                raise ConfigError(f"{self.source}: the scheme has {grouping.num_groups} groups but "
                                  f"the small model has {what}={count}")
            return grouping
        return self.resolve(count * self.factor, what)


def _validated(groups: Sequence[Sequence[int]], size: int, what: str, source: str) -> Grouping:
    seen: dict[int, int] = {}
    for i, group in enumerate(groups):
        for unit in group:
            if not 0 <= unit < size:
                raise ConfigError(f"{source}: group {i} names {what} index {unit}, out of range "
                                  f"[0, {size})")
            if unit in seen:
                raise ConfigError(f"{source}: {what} index {unit} appears in groups {seen[unit]} "
                                  f"and {i}; each index must appear exactly once")
            seen[unit] = i
    missing = sorted(set(range(size)) - set(seen))
    if missing:
        raise ConfigError(f"{source}: the scheme covers {len(seen)} of {size} {what}; "
                          f"missing indices {missing}")
    return Grouping(tuple(tuple(g) for g in groups), size)


@dataclass(frozen=True)
class LevelSchemes:
    """How one level maps to the next: a width scheme, a depth scheme, or both (None = keep)."""

    width: Optional[SchemeSpec] = None
    depth: Optional[SchemeSpec] = None
    # De-coalescing preserves the (pre-LN) model's function exactly (an mlmega option). Width, tied
    # embeddings: the residual writers (attention proj, FFN fc2) take the embeddings' 1/g too, so
    # the whole residual stream is scaled alike (the paper scales the embeddings only). Depth: the
    # copies after a group's first layer start as identity blocks (see LevelMap.identity_copies).
    preserve_function: bool = False

    def __post_init__(self) -> None:
        if self.width is None and self.depth is None:
            raise ConfigError("a level map needs a width scheme, a depth scheme, or both")

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "LevelSchemes":
        """mlmega form ``{width: .., depth: ..}`` or the reference's ``{width_scheme, depth_scheme}``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping with width and/or depth schemes")
        if "width_scheme" in data or "depth_scheme" in data:
            for key in ("reserved_heads", "reserved_layers"):
                if data.get(key):
                    raise ConfigError(f"{source}: {key}={data[key]!r} is not supported; "
                                      f"expected an empty list")
            allowed = {"width_scheme", "depth_scheme", "reserved_heads", "reserved_layers"}
            names = {"width": "width_scheme", "depth": "depth_scheme"}
        else:
            allowed = {"width", "depth", "preserve_function"}
            names = {"width": "width", "depth": "depth"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; expected {sorted(allowed)}")
        specs = {axis: SchemeSpec.parse(data[key], f"{source}: {key}")
                 for axis, key in names.items() if data.get(key) is not None}
        preserve = data.get("preserve_function", False)
        if not isinstance(preserve, bool):
            raise ConfigError(f"{source}: preserve_function={preserve!r}: expected true or false")
        return cls(**specs, preserve_function=preserve)

    @classmethod
    def load(cls, path: str | Path) -> "LevelSchemes":
        """Read a scheme file: YAML (mlmega) or JSON (the reference implementation's format)."""
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read scheme file: {err}") from err
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict:
        """The mlmega form that :meth:`from_dict` reads back."""
        out: dict[str, Any] = {}
        for axis in ("width", "depth"):
            spec = getattr(self, axis)
            if spec is not None:
                out[axis] = ({"groups": [list(g) for g in spec.groups]} if spec.kind == "custom"
                             else {"kind": spec.kind, "factor": spec.factor})
        if self.preserve_function:
            out["preserve_function"] = True
        return out

    @classmethod
    def from_factors(cls, width_factor: Optional[int] = None, depth_factor: Optional[int] = None,
                     width_kind: str = "stacked", depth_kind: str = "adjacent") -> "LevelSchemes":
        """Named schemes from factors (CLI flags); a factor of None or 1 leaves that side alone."""
        def spec(kind, factor, name):
            return (SchemeSpec.parse({"kind": kind, "factor": factor}, name)
                    if factor not in (None, 1) else None)
        return cls(spec(width_kind, width_factor, "--width-factor"),
                   spec(depth_kind, depth_factor, "--depth-factor"))
