"""How far a V-cycle's final model has moved from the small level it was de-coalesced from."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from mlmega.checkpoint.formats import load_full_state
from mlmega.config.model import ModelConfig
from mlmega.config.schemes import LevelSchemes
from mlmega.models.params import iter_params
from mlmega.models.state import StateDict
from mlmega.operators.level_map import coalesce, decoalesce


def copies_spread(state: StateDict, cfg: ModelConfig, schemes: LevelSchemes) -> float:
    """||W - D(C(W))|| / ||W|| over the transformer layers' matrices, C and D the width coalescing
    and de-coalescing of ``schemes`` (its depth scheme left out). 0 while every copy equals the
    others of its group: the large model computes what one of the small level's width could.
    sqrt(3/4) = 0.87 for a random model with a factor-2 grouping (the layers' matrices are
    grouped along both dimensions: D(C(W)) keeps a quarter of their energy)."""
    width = dataclasses.replace(schemes, depth=None)
    small, small_cfg = coalesce(state, cfg, width)
    projected, _ = decoalesce(small, small_cfg, width)
    names = [name for name, _, layer in iter_params(cfg)
             if layer is not None and state[name].dim() == 2]
    off = sum(float((state[n].double() - projected[n].double()).square().sum()) for n in names)
    total = sum(float(state[n].double().square().sum()) for n in names)
    return (off / total) ** 0.5


def checkpoint_spread(checkpoint: Path, schemes: LevelSchemes) -> Optional[float]:
    """:func:`copies_spread` of the latest checkpoint in ``checkpoint``; None without a width
    scheme."""
    if schemes.width is None:
        return None
    state, layout = load_full_state(checkpoint)
    return copies_spread(state, layout.cfg, schemes)
