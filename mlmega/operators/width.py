"""Width coalescing / de-coalescing of single tensors (pure functions of tensors and the table).

Per tensor dim with a width side (see :mod:`mlmega.models.params`), the dim is viewed as
[lead, units, chunk] and a unit-level matrix M acts on the units axis:

  coalesce:    out-side M = F (average the group)      in-side M = T^T (sum the group)
  decoalesce:  out-side M = T (duplicate)              in-side M = F^T (split evenly)

so W_small = F_out W S_in and W_large = T_out W_small F_in, with S = T. Since F T = I, coalescing
undoes de-coalescing exactly.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig
from mlmega.models.params import IN, OUT, WIDTH_SPACES, ParamSpec, space_layout
from mlmega.config.schemes import Grouping

COALESCE, DECOALESCE = "coalesce", "decoalesce"


@functools.lru_cache(maxsize=32)
def unit_matrices(grouping: Grouping, direction: str) -> dict[str, torch.Tensor]:
    """The unit-level matrix for each width side in ``direction`` (new units x old units); cached,
    so read-only."""
    f, t = grouping.average_matrix(), grouping.copy_matrix()
    if direction == COALESCE:
        return {OUT: f, IN: t.T}
    if direction == DECOALESCE:
        return {OUT: t, IN: f.T}
    raise ValueError(f"direction must be {COALESCE!r} or {DECOALESCE!r}, got {direction!r}")


def map_width(tensor: torch.Tensor, spec: ParamSpec, cfg: ModelConfig,
              matrices: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply the width map to one full tensor of the model ``cfg`` (the source model)."""
    copies = broadcast_copies(tensor, spec, cfg, matrices)
    if copies is not None:  # one pass: lay the broadcast view out as the large tensor
        return copies.reshape(_mapped_shape(tensor, spec, cfg, matrices))
    units = cfg.num_query_groups
    compute = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    out = tensor.to(compute)
    for dim, (space, side) in enumerate(zip(spec.dims, spec.sides)):
        if side is None or space not in WIDTH_SPACES:
            continue
        lead, length = space_layout(cfg, space)
        shape = out.shape
        view = out.reshape(*shape[:dim], lead, units, length // units, *shape[dim + 1:])
        mapped = _apply_unit_matrix(matrices[side], view, dim + 1)
        out = mapped.reshape(*shape[:dim], lead * mapped.shape[dim + 1] * (length // units),
                             *shape[dim + 1:])
    return out.to(tensor.dtype)


def _mapped_shape(tensor: torch.Tensor, spec: ParamSpec, cfg: ModelConfig,
                 matrices: dict[str, torch.Tensor]) -> list[int]:
    """The shape of ``map_width(tensor, ...)``."""
    units = cfg.num_query_groups
    return [size if side is None or space not in WIDTH_SPACES
            else size // units * matrices[side].shape[0]
            for size, space, side in zip(tensor.shape, spec.dims, spec.sides)]


def broadcast_copies(tensor: torch.Tensor, spec: ParamSpec, cfg: ModelConfig,
                     matrices: dict[str, torch.Tensor],
                     units_block: Optional[tuple[int, int, int]] = None) -> Optional[torch.Tensor]:
    """The width map as a broadcast view of ``tensor`` (scaled once), or None where it is not one.

    De-coalescing with adjacent or stacked schemes copies every unit to ``g`` units in a regular
    order (each with one weight: 1 out-side, 1/g in-side). The view has a copy axis (stride 0)
    beside each units axis: laid out contiguously it is the mapped tensor, and as it is, the
    same elements in the mapped tensor's ``reshape`` to ``view.shape``. Dims without a width side
    are axes of their own, so slicing ``tensor`` on such a dim slices the result alike.
    ``units_block`` (dim, start, count) keeps only mapped units [start, start + count) of width
    dim ``dim`` (in every lead block: a tensor-parallel shard's units); None if those do not form
    a block of the view's unit grid.
    """
    units = cfg.num_query_groups
    view_shape, expanded_shape, weights, copied = [], [], [], False
    block_axes = None  # the (units, copies) grid axes of units_block's dim, major first
    for dim, (size, space, side) in enumerate(zip(tensor.shape, spec.dims, spec.sides)):
        if side is None or space not in WIDTH_SPACES:
            view_shape.append(size)
            expanded_shape.append(size)
            continue
        pattern = _copy_pattern(matrices[side])
        if pattern is None:
            return None
        adjacent, copies, weight = pattern
        lead, length = space_layout(cfg, space)
        chunk = length // units
        if units_block is not None and units_block[0] == dim:
            block_axes = len(view_shape) + 1
        view_shape += [lead, units, 1, chunk] if adjacent else [lead, 1, units, chunk]
        expanded_shape += [lead, units, copies, chunk] if adjacent else [lead, copies, units, chunk]
        weights.append(weight)
        copied = copied or copies > 1
    if not copied or (units_block is not None and block_axes is None):
        return None  # nothing copied (no width dim, or groups of one): the general path
    small, compute = tensor, torch.float64 if tensor.dtype == torch.float64 else torch.float32
    for weight in (w for w in weights if w != 1):  # in the compute dtype, as the general path
        small = (small.to(compute) * weight).to(tensor.dtype)
    view = small.reshape(view_shape).expand(expanded_shape)
    if units_block is None:
        return view
    _, start, count = units_block
    minor = expanded_shape[block_axes + 1]  # mapped unit j sits at (j // minor, j % minor)
    if start % minor == 0 and count % minor == 0:  # whole rows of the grid
        return view.narrow(block_axes, start // minor, count // minor)
    if start // minor == (start + count - 1) // minor:  # within one row
        return view.narrow(block_axes, start // minor, 1).narrow(block_axes + 1, start % minor,
                                                                 count)
    return None


def _copy_pattern(m: torch.Tensor) -> Optional[tuple[bool, int, float]]:
    """(adjacent, copies, weight) when ``m`` (new x old units) gives every new unit one old unit
    with one common weight, new units ordered old-major (adjacent: 0 0 1 1) or copy-major
    (stacked: 0 1 0 1); else None."""
    new, old = m.shape
    nonzero = m.nonzero()  # row-major
    if new % old or nonzero.shape[0] != new or not torch.equal(nonzero[:, 0], torch.arange(new)):
        return None
    weights = m[nonzero[:, 0], nonzero[:, 1]]
    if not bool((weights == weights[0]).all()):
        return None
    copies, cols = new // old, nonzero[:, 1]
    if torch.equal(cols, torch.arange(old).repeat_interleave(copies)):
        return True, copies, float(weights[0])
    if torch.equal(cols, torch.arange(old).repeat(copies)):
        return False, copies, float(weights[0])
    return None


def _apply_unit_matrix(m: torch.Tensor, view: torch.Tensor, axis: int) -> torch.Tensor:
    """``m`` (new units x old units) applied along ``axis`` of ``view``.

    The scheme matrices have the same number of non-zeros in every row (equal groups), so the map
    is a weighted sum of a few selections: one pass over the data per non-zero in a row (1 to
    de-coalesce, the group size to coalesce) instead of a dense contraction and its copies. For
    adjacent and stacked groups the selections are strided views, not index-selected copies.
    """
    rows = m.shape[0]
    nonzero = m.nonzero()  # row-major: each row's non-zero columns in order
    per_row = nonzero.shape[0] // rows
    if per_row * rows != nonzero.shape[0] or not torch.equal(
            nonzero[:, 0], torch.arange(rows).repeat_interleave(per_row)):
        return torch.movedim(torch.tensordot(m.to(view.dtype), view, dims=([1], [axis])), 0, axis)
    cols = nonzero[:, 1].reshape(rows, per_row)
    weights = m[nonzero[:, 0], nonzero[:, 1]].reshape(rows, per_row).to(view.dtype)
    members = _member_views(view, axis, cols)
    out = None
    for k in range(per_row):
        w = weights[:, k].reshape(-1, *([1] * (view.dim() - axis - 1)))
        scaled = not bool((w == 1).all())  # copies and sums need no pass; averages and splits do
        if members is None:
            term = view.index_select(axis, cols[:, k])
            if scaled:
                term.mul_(w)
        else:  # a view of the input: never written to
            term = members(k)
            if scaled:
                term = term * w
            elif out is None:
                term = term.clone(memory_format=torch.contiguous_format)
        out = term if out is None else out.add_(term)
    return out


def _member_views(view: torch.Tensor, axis: int, cols: torch.Tensor):
    """k -> the k-th member of every group along ``axis`` as a view, for groups (rows of
    ``cols``) of consecutive units (adjacent) or of units a group count apart (stacked) that
    cover the axis; None for other groupings."""
    rows, per_row = cols.shape
    shape, units = view.shape, torch.arange(rows * per_row)
    if shape[axis] != rows * per_row:
        return None
    if torch.equal(cols, units.reshape(rows, per_row)):  # adjacent
        grouped = view.reshape(*shape[:axis], rows, per_row, *shape[axis + 1:])
        return lambda k: grouped.select(axis + 1, k)
    if torch.equal(cols, units.reshape(per_row, rows).T):  # stacked
        grouped = view.reshape(*shape[:axis], per_row, rows, *shape[axis + 1:])
        return lambda k: grouped.select(axis, k)
    return None


def width_config(cfg: ModelConfig, grouping: Grouping, direction: str) -> ModelConfig:
    """The config of the model on the other side of the width map (heads and widths scaled)."""
    units = cfg.num_query_groups
    expected = grouping.size if direction == COALESCE else grouping.num_groups
    if units != expected:
        what = "query groups" if cfg.num_query_groups != cfg.num_attention_heads else "heads"
        raise ConfigError(f"width scheme ({grouping.num_groups} groups of {grouping.size} units) "
                          f"does not fit a model with {units} {what} ({cfg.source}); expected "
                          f"{'a scheme over' if direction == COALESCE else 'a scheme with'} "
                          f"{units} {'units' if direction == COALESCE else 'groups'}")
    sizes = sorted({len(group) for group in grouping.groups})
    if len(sizes) > 1:  # unequal groups would weight LayerNorm statistics by group size
        raise ConfigError(f"width scheme groups have sizes {sizes}; every width group must merge "
                          f"the same number of heads/query groups")
    if cfg.ffn_hidden_size % units:
        raise ConfigError(f"{cfg.source}: ffn_hidden_size={cfg.ffn_hidden_size} is not divisible "
                          f"by the {units} width units (query groups)")
    new_units = grouping.num_groups if direction == COALESCE else grouping.size

    def scale(value: int) -> int:
        return value // units * new_units

    return cfg.replace(hidden_size=scale(cfg.hidden_size),
                       num_attention_heads=scale(cfg.num_attention_heads),
                       num_query_groups=new_units,
                       ffn_hidden_size=scale(cfg.ffn_hidden_size))
