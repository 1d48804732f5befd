"""The multi-level operators: pure functions of tensors, configs and schemes (no files, ranks, SLURM)."""

from mlmega.config.schemes import Grouping, LevelSchemes, SchemeSpec  # the schemes they take
from mlmega.operators.level_map import LevelMap, coalesce, decoalesce, interpolate, interpolate_tensor

__all__ = ["Grouping", "LevelMap", "LevelSchemes", "SchemeSpec", "coalesce", "decoalesce",
           "interpolate", "interpolate_tensor"]
