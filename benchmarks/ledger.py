"""What the savings protocol keeps of a finished run, small enough to commit: one JSON per run.

A run's directory holds checkpoints (megabytes to gigabytes, never committed); the protocol needs
only the run's validation curve and, for a V-cycle, its final model's copies' spread. The ledger
keeps those, keyed by the run's name and checked against its recipe, so that a protocol that lost
its --out (a new machine, a cleaned scratch disk) continues from every run it had finished instead
of training them again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Optional

from mlmega.checkpoint.atomic import write_text_atomic
from mlmega.config.errors import ConfigError
from mlmega.config.schemes import LevelSchemes


def schemes_key(schemes: LevelSchemes) -> str:
    """``schemes`` as the spread depends on them: kinds, factors and groups (not where a recipe
    spelled them)."""
    def spec(s):
        return None if s is None else {k: v for k, v in dataclasses.asdict(s).items()
                                       if k != "source"}
    return json.dumps(dict(width=spec(schemes.width), depth=spec(schemes.depth),
                           preserve_function=schemes.preserve_function), sort_keys=True)


def this_machine() -> str:
    """The CPU model and core count: what a run's seconds depend on (its FLOPs do not)."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in
                     Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


@dataclasses.dataclass
class LedgerEntry:
    """A finished run: its recipe (as ``savings.recipe_key`` writes it), its validation curve
    (``savings.Curve.to_dict``), the copies' spreads measured on its final checkpoint, keyed by
    ``stage`` + scheme (:func:`schemes_key`), and the machine it was timed on
    (:func:`this_machine`)."""

    name: str
    recipe: str
    curve: dict
    spreads: dict[str, Optional[float]] = dataclasses.field(default_factory=dict)
    machine: str = "unknown"


class RunLedger:
    """``DIR/NAME.json`` per finished run; each write atomic (a crash leaves the old entry or
    none)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def get(self, name: str, recipe: str) -> Optional[LedgerEntry]:
        """The entry of run ``name``; None if there is none. A stored entry of another recipe is
        an error: the benchmark changed, and its numbers belong to the old one."""
        path = self.path(name)
        if not path.exists():
            return None
        try:
            entry = LedgerEntry(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{path}: not a ledger entry ({e}); delete it to train the run "
                              "again") from None
        if entry.recipe != recipe:
            raise ConfigError(f"{path}: recorded for another recipe than {name} is now (the "
                              f"benchmark changed?); delete it or use another --ledger")
        return entry

    def put(self, entry: LedgerEntry) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path(entry.name),
                          json.dumps(dataclasses.asdict(entry), indent=1) + "\n")
