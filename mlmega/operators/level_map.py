"""A resolved map between two adjacent V-cycle levels, and the operators on full state dicts.

:class:`LevelMap` fixes the large and small configs and the width/depth groupings; its tensor- and
layer-level methods are what per-rank (sharded) conversion streams through, and
:func:`coalesce` / :func:`decoalesce` / :func:`interpolate` apply them to whole state dicts.
Width is applied first, then depth, in both directions (the two commute: they act on different axes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig
from mlmega.models.params import ParamSpec, iter_params
from mlmega.models.state import StateDict, check_state_dict
from mlmega.operators.schemes import Grouping, LevelSchemes
from mlmega.operators.width import COALESCE, DECOALESCE, map_width, unit_matrices, width_config

Reader = Callable[[str], torch.Tensor]  # global parameter name -> full tensor


@dataclass(frozen=True)
class LevelMap:
    """Large level <-> small level: configs plus width (query-group) and depth (layer) groupings."""

    large: ModelConfig
    small: ModelConfig
    width: Optional[Grouping]
    depth: Optional[Grouping]

    @classmethod
    def from_large(cls, large: ModelConfig, schemes: LevelSchemes) -> "LevelMap":
        width = schemes.width.resolve(large.num_query_groups, _unit_name(large)) \
            if schemes.width else None
        depth = schemes.depth.resolve(large.num_layers, "num_layers") if schemes.depth else None
        small = width_config(large, width, COALESCE) if width else large
        if depth:
            small = small.replace(num_layers=depth.num_groups)
        return cls(large, small, width, depth)

    @classmethod
    def from_small(cls, small: ModelConfig, schemes: LevelSchemes) -> "LevelMap":
        width = schemes.width.resolve_from_small(small.num_query_groups, _unit_name(small)) \
            if schemes.width else None
        depth = schemes.depth.resolve_from_small(small.num_layers, "num_layers") \
            if schemes.depth else None
        large = width_config(small, width, DECOALESCE) if width else small
        if depth:
            large = large.replace(num_layers=depth.size)
        return cls(large, small, width, depth)

    # -- tensor and layer level (what sharded conversion streams through) ----------------------
    def coalesce_tensor(self, spec: ParamSpec, tensor: torch.Tensor) -> torch.Tensor:
        if self.width is None:
            return tensor
        return map_width(tensor, spec, self.large, unit_matrices(self.width, COALESCE))

    def decoalesce_tensor(self, spec: ParamSpec, tensor: torch.Tensor) -> torch.Tensor:
        if self.width is None:
            return tensor
        return map_width(tensor, spec, self.small, unit_matrices(self.width, DECOALESCE))

    def coalesce_sources(self, small_layer: int) -> list[tuple[int, float]]:
        """(large layer, weight) pairs whose weighted sum is small layer ``small_layer`` (row of R)."""
        if self.depth is None:
            return [(small_layer, 1.0)]
        group = self.depth.groups[small_layer]
        return [(layer, 1.0 / len(group)) for layer in group]

    def decoalesce_source(self, large_layer: int) -> int:
        """The small layer that large layer ``large_layer`` copies (G = rownorm(R^T))."""
        return self.depth.group_of(large_layer) if self.depth else large_layer

    def coalesced_param(self, spec: ParamSpec, layer: Optional[int], read: Reader) -> torch.Tensor:
        """Small-model tensor ``spec`` (at small ``layer``) from large tensors fetched by ``read``."""
        if layer is None:
            return self.coalesce_tensor(spec, read(spec.name()))
        total, dtype = None, None
        for source, weight in self.coalesce_sources(layer):
            large = read(spec.name(source))
            dtype = large.dtype
            term = self.coalesce_tensor(spec, large).to(torch.float64) * weight
            total = term if total is None else total + term
        return total.to(dtype)

    def decoalesced_param(self, spec: ParamSpec, layer: Optional[int], read: Reader) -> torch.Tensor:
        """Large-model tensor ``spec`` (at large ``layer``) from small tensors fetched by ``read``."""
        source = spec.name() if layer is None else spec.name(self.decoalesce_source(layer))
        return self.decoalesce_tensor(spec, read(source))


def _unit_name(cfg: ModelConfig) -> str:
    return "num_query_groups" if cfg.num_query_groups != cfg.num_attention_heads \
        else "num_attention_heads"


def coalesce(state: StateDict, cfg: ModelConfig, schemes: LevelSchemes) -> tuple[StateDict, ModelConfig]:
    """Coalesce a full state dict of model ``cfg``; returns the small state dict and config."""
    level = LevelMap.from_large(cfg, schemes)
    check_state_dict(state, cfg, "coalesce input")
    out = {name: level.coalesced_param(spec, layer, state.__getitem__)
           for name, spec, layer in iter_params(level.small)}
    return out, level.small


def decoalesce(state: StateDict, cfg: ModelConfig, schemes: LevelSchemes) -> tuple[StateDict, ModelConfig]:
    """De-coalesce a full state dict of the small model ``cfg``; returns the large one and config."""
    level = LevelMap.from_small(cfg, schemes)
    check_state_dict(state, cfg, "de-coalesce input")
    out = {name: level.decoalesced_param(spec, layer, state.__getitem__)
           for name, spec, layer in iter_params(level.large)}
    return out, level.large


def interpolate(large: StateDict, decoalesced: StateDict, cfg: ModelConfig, alpha: float) -> StateDict:
    """(1 - alpha) * large + alpha * decoalesced, tensor by tensor; both must be models of ``cfg``."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha!r}: expected a number in [0, 1]")
    check_state_dict(large, cfg, "interpolation: large model")
    check_state_dict(decoalesced, cfg, "interpolation: de-coalesced model")
    return {name: interpolate_tensor(large[name], decoalesced[name], alpha) for name in large}


def interpolate_tensor(large: torch.Tensor, decoalesced: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exact at both ends: alpha=0 gives ``large``, alpha=1 gives ``decoalesced``."""
    return ((1.0 - alpha) * large.double() + alpha * decoalesced.double()).to(large.dtype)
