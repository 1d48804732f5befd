"""Width coalescing / de-coalescing of single tensors (pure functions of tensors and the table).

Per tensor dim with a width side (see :mod:`mlmega.models.params`), the dim is viewed as
[lead, units, chunk] and a unit-level matrix M acts on the units axis:

  coalesce:    out-side M = F (average the group)      in-side M = T^T (sum the group)
  decoalesce:  out-side M = T (duplicate)              in-side M = F^T (split evenly)

so W_small = F_out W S_in and W_large = T_out W_small F_in, with S = T. Since F T = I, coalescing
undoes de-coalescing exactly.
"""

from __future__ import annotations

import torch

from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig
from mlmega.models.params import IN, OUT, WIDTH_SPACES, ParamSpec, space_layout
from mlmega.operators.schemes import Grouping

COALESCE, DECOALESCE = "coalesce", "decoalesce"


def unit_matrices(grouping: Grouping, direction: str) -> dict[str, torch.Tensor]:
    """The unit-level matrix for each width side in ``direction`` (new units x old units)."""
    f, t = grouping.average_matrix(), grouping.copy_matrix()
    if direction == COALESCE:
        return {OUT: f, IN: t.T}
    if direction == DECOALESCE:
        return {OUT: t, IN: f.T}
    raise ValueError(f"direction must be {COALESCE!r} or {DECOALESCE!r}, got {direction!r}")


def map_width(tensor: torch.Tensor, spec: ParamSpec, cfg: ModelConfig,
              matrices: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply the width map to one full tensor of the model ``cfg`` (the source model)."""
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


def _apply_unit_matrix(m: torch.Tensor, view: torch.Tensor, axis: int) -> torch.Tensor:
    """``m`` (new units x old units) applied along ``axis`` of ``view``.

    The scheme matrices have the same number of non-zeros in every row (equal groups), so the map
    is a weighted sum of a few index selections: one pass over the data per non-zero in a row
    (1 to de-coalesce, the group size to coalesce) instead of a dense contraction and its copies.
    """
    rows = m.shape[0]
    nonzero = m.nonzero()  # row-major: each row's non-zero columns in order
    per_row = nonzero.shape[0] // rows
    if per_row * rows != nonzero.shape[0] or not torch.equal(
            nonzero[:, 0], torch.arange(rows).repeat_interleave(per_row)):
        return torch.movedim(torch.tensordot(m.to(view.dtype), view, dims=([1], [axis])), 0, axis)
    cols = nonzero[:, 1].reshape(rows, per_row)
    weights = m[nonzero[:, 0], nonzero[:, 1]].reshape(rows, per_row).to(view.dtype)
    out = None
    for k in range(per_row):
        term = view.index_select(axis, cols[:, k])
        w = weights[:, k]
        if not bool((w == 1).all()):  # copies and sums need no pass; averages and splits do
            term.mul_(w.reshape(-1, *([1] * (view.dim() - axis - 1))))
        out = term if out is None else out.add_(term)
    return out


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
