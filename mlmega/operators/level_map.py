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
from mlmega.models.params import ParamSpec, global_shape, iter_params
from mlmega.models.state import StateDict, check_state_dict
from mlmega.config.schemes import Grouping, LevelSchemes
from mlmega.operators.width import (COALESCE, DECOALESCE, broadcast_copies, map_width,
                                    unit_matrices, width_config)

Reader = Callable[[str], torch.Tensor]  # global parameter name -> full tensor


@dataclass(frozen=True)
class LevelMap:
    """Large level <-> small level: configs plus width (query-group) and depth (layer) groupings."""

    large: ModelConfig
    small: ModelConfig
    width: Optional[Grouping]
    depth: Optional[Grouping]
    residual_scale: float = 1.0  # large-model residual writers = residual_scale x mapped small ones
    # preserve_function with a depth scheme: a small layer's residual writers are the *sum* of its
    # group's (x + f1(x) + f2(x) ~ x + (f1 + f2)(x)), and de-coalescing gives them to the group's
    # first layer only: the other copies start as identity blocks, so the large model computes
    # exactly what the small one did (pre-LN) while coalesce(decoalesce(theta)) == theta still holds.
    identity_copies: bool = False

    @classmethod
    def from_large(cls, large: ModelConfig, schemes: LevelSchemes) -> "LevelMap":
        width = schemes.width.resolve(large.num_query_groups, _unit_name(large)) \
            if schemes.width else None
        depth = schemes.depth.resolve(large.num_layers, "num_layers") if schemes.depth else None
        small = width_config(large, width, COALESCE) if width else large
        if depth:
            small = small.replace(num_layers=depth.num_groups)
        return cls(large, small, width, depth, _residual_scale(large, width, schemes),
                   schemes.preserve_function and depth is not None)

    @classmethod
    def from_small(cls, small: ModelConfig, schemes: LevelSchemes) -> "LevelMap":
        width = schemes.width.resolve_from_small(small.num_query_groups, _unit_name(small)) \
            if schemes.width else None
        depth = schemes.depth.resolve_from_small(small.num_layers, "num_layers") \
            if schemes.depth else None
        large = width_config(small, width, DECOALESCE) if width else small
        if depth:
            large = large.replace(num_layers=depth.size)
        return cls(large, small, width, depth, _residual_scale(small, width, schemes),
                   schemes.preserve_function and depth is not None)

    # -- tensor and layer level (what sharded conversion streams through) ----------------------
    def coalesce_tensor(self, spec: ParamSpec, tensor: torch.Tensor) -> torch.Tensor:
        if self.width is None:
            return tensor
        out = map_width(tensor, spec, self.large, unit_matrices(self.width, COALESCE))
        return out / self.residual_scale if spec.residual and self.residual_scale != 1 else out

    def decoalesce_tensor(self, spec: ParamSpec, tensor: torch.Tensor) -> torch.Tensor:
        if self.width is None:
            return tensor
        out = map_width(tensor, spec, self.small, unit_matrices(self.width, DECOALESCE))
        return out * self.residual_scale if spec.residual and self.residual_scale != 1 else out

    def decoalesce_broadcast(self, spec: ParamSpec, tensor: torch.Tensor,
                             units_block: Optional[tuple[int, int, int]] = None
                             ) -> Optional[torch.Tensor]:
        """:meth:`decoalesce_tensor` as a broadcast view of ``tensor`` (see
        :func:`~mlmega.operators.width.broadcast_copies`, also for ``units_block``): the same
        elements, in the large tensor's ``reshape`` to the view's shape, without making the
        large tensor. None where de-coalescing ``spec`` is not one broadcast."""
        if self.width is None:
            return tensor if units_block is None else None
        if spec.residual and self.residual_scale != 1:
            return None
        return broadcast_copies(tensor, spec, self.small, unit_matrices(self.width, DECOALESCE),
                                units_block)

    def decoalesced_view(self, spec: ParamSpec, layer: Optional[int], read: Reader,
                         units_block: Optional[tuple[int, int, int]] = None
                         ) -> Optional[torch.Tensor]:
        """:meth:`decoalesced_param` as a broadcast view (:meth:`decoalesce_broadcast`); None
        where it is not one, identity blocks included."""
        if layer is None:
            return self.decoalesce_broadcast(spec, read(spec.name()), units_block)
        if self._identity_block(spec, layer):
            return None
        return self.decoalesce_broadcast(spec, read(spec.name(self.decoalesce_source(layer))),
                                         units_block)

    def _identity_block(self, spec: ParamSpec, layer: int) -> bool:
        """Whether ``spec`` of large layer ``layer`` starts as zero: a residual writer of a depth
        copy other than its group's first, under ``identity_copies``."""
        group = self.depth.groups[self.decoalesce_source(layer)] if self.depth else (layer,)
        return self.identity_copies and spec.residual and layer != group[0]

    def coalesce_sources(self, spec: ParamSpec, small_layer: int) -> list[tuple[int, float]]:
        """(large layer, weight) pairs whose weighted sum is ``spec`` of small layer ``small_layer``
        (a row of R; weight 1 for residual writers when ``identity_copies``)."""
        if self.depth is None:
            return [(small_layer, 1.0)]
        group = self.depth.groups[small_layer]
        weight = 1.0 if self.identity_copies and spec.residual else 1.0 / len(group)
        return [(layer, weight) for layer in group]

    def decoalesce_source(self, large_layer: int) -> int:
        """The small layer that large layer ``large_layer`` copies (G = rownorm(R^T))."""
        return self.depth.group_of(large_layer) if self.depth else large_layer

    def coalesced_param(self, spec: ParamSpec, layer: Optional[int], read: Reader) -> torch.Tensor:
        """Small-model tensor ``spec`` (at small ``layer``) from large tensors fetched by ``read``."""
        if layer is None:
            return self.coalesce_tensor(spec, read(spec.name()))
        sources = self.coalesce_sources(spec, layer)
        if len(sources) == 1:  # no depth grouping: nothing to average
            return self.coalesce_tensor(spec, read(spec.name(sources[0][0])))
        total, dtype = None, None
        for source, weight in sources:
            large = read(spec.name(source))
            dtype = large.dtype
            # the weighted sum in float32 (float64 for float64 tensors), as the width maps compute
            compute = torch.float64 if dtype == torch.float64 else torch.float32
            term = self.coalesce_tensor(spec, large).to(compute) * weight  # never in place:
            del large  # the mapped tensor may be what read() returned (a caller's state dict's)
            total = term if total is None else total.add_(term)
            del term
        return total.to(dtype)

    def decoalesced_param(self, spec: ParamSpec, layer: Optional[int], read: Reader) -> torch.Tensor:
        """Large-model tensor ``spec`` (at large ``layer``) from small tensors fetched by ``read``."""
        if layer is None:
            return self.decoalesce_tensor(spec, read(spec.name()))
        small = read(spec.name(self.decoalesce_source(layer)))
        if self._identity_block(spec, layer):
            return torch.zeros(global_shape(self.large, spec), dtype=small.dtype)
        return self.decoalesce_tensor(spec, small)


def _residual_scale(cfg: ModelConfig, width: Optional[Grouping], schemes: LevelSchemes) -> float:
    """1/g when the residual writers follow the tied embeddings' 1/g (see preserve_function)."""
    if width is None or not (schemes.preserve_function and cfg.tie_embeddings):
        return 1.0
    return 1.0 / len(width.groups[0])  # width groups all have one size


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


_CHUNK = 1 << 22  # elements per float32 block of interpolate_tensor for 16-bit tensors (16 MB)


def interpolate_tensor(large: torch.Tensor, decoalesced: torch.Tensor, alpha: float,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(1 - alpha) * large + alpha * decoalesced, exact at both ends (alpha=0 gives ``large``,
    alpha=1 ``decoalesced``: torch.lerp's two-sided formula) and within float rounding between.

    One pass in the tensors' dtype for float32/float64; 16-bit tensors are mixed in float32 block
    by block, so the temporaries stay at a few blocks however large the tensor is. The result goes
    to ``out`` (contiguous, ``large``'s shape and dtype; may be ``large`` itself), by default to
    fresh memory.
    """
    if large.shape != decoalesced.shape:
        raise ValueError(f"interpolate: shapes {tuple(large.shape)} and "
                         f"{tuple(decoalesced.shape)} differ")
    if out is None:
        out = torch.empty(large.shape, dtype=large.dtype)
    elif out.shape != large.shape or out.dtype != large.dtype or not out.is_contiguous():
        raise ValueError("interpolate: out must be contiguous with the inputs' shape and dtype")
    if large.dtype in (torch.float32, torch.float64):
        return torch.lerp(large, decoalesced.to(large.dtype), alpha, out=out)
    flat_out, flat_l, flat_d = out.view(-1), large.reshape(-1), decoalesced.reshape(-1)
    for start in range(0, flat_out.numel(), _CHUNK):
        end = min(start + _CHUNK, flat_out.numel())
        block = torch.lerp(flat_l[start:end].float(), flat_d[start:end].float(), alpha)
        flat_out[start:end].copy_(block)
    return out
