"""A conversion's target tensors, made from the source checkpoint(s) one parameter at a time.

To make target rank (tp, pp)'s tensors, only the source tensors it needs are read, one parameter at
a time: gathered over the source's TP ranks, mapped by the operator (identity, coalesce,
de-coalesce, de-coalesce + interpolate), split for the target TP rank; the tensors TP splits on the
vocabulary (embeddings, output layer) go block by block of rows.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from mlmega.checkpoint.convert_plan import ConversionPlan
from mlmega.checkpoint.formats import open_checkpoint
from mlmega.checkpoint.streaming import RowBlocks, materialized
from mlmega.operators import interpolate_tensor

_ROWS_PER_BLOCK = 1024  # embeddings are read and mapped this many rows at a time


class _Producer:
    """Full target tensors, computed from the source checkpoint(s) on demand."""

    def __init__(self, plan: ConversionPlan):
        self.plan = plan
        checks = dict(verify=plan.verify, check_finite=plan.check_finite,
                      vocab_size=plan.vocab_size)
        self.source = open_checkpoint(plan.src, **checks)
        self.large = open_checkpoint(plan.large, **checks) if plan.large else None
        self._last_read: tuple[str, Optional[torch.Tensor]] = ("", None)

    def mapped(self, param) -> torch.Tensor:
        """The full tensor of ``param`` after the level operator (de-coalesced, for interpolate)."""
        op, level = self.plan.op, self.plan.level
        if op == "reshard":
            return self.source.read(param.global_name)
        if op == "coalesce":
            return level.coalesced_param(param.spec, param.layer, self.source.read)
        read = self.source.read if param.layer is None else self._read_kept
        return level.decoalesced_param(param.spec, param.layer, read)

    def _read_kept(self, name: str) -> torch.Tensor:
        """The source's tensor ``name``, the last one read kept: the large layers a depth group
        copies come one after another (parameters go layer-minor), and interpolation visits a
        tensor once per target TP rank, all reading the same small tensor. Nothing modifies
        what it returns (the mix writes into the large shards). Not for the embeddings: it would
        hold the largest tensor while the next ones are made."""
        if self._last_read[0] != name:
            self._last_read = ("", None)  # let the previous tensor go before reading
            self._last_read = (name, self.source.read(name))
        return self._last_read[1]

    def shards(self, param, tp_ranks: Sequence[int]) -> list[torch.Tensor | RowBlocks]:
        """Target TP ranks ``tp_ranks``' shards of ``param`` (a LocalParam), each fresh memory (or
        row blocks, see :meth:`_row_blocks`); the full tensor is gathered and mapped once for all
        of them (interpolation: see :meth:`_interpolated`)."""
        if param.layer is None and _vocab_split(param.spec):
            return self._row_blocks(param, tp_ranks)
        if self.plan.op == "interpolate":
            return self._interpolated(param, tp_ranks)
        target, spec = self.plan.target, param.spec
        full = self.mapped(param)
        if target.tp == 1 and tuple(full.shape) == target.local_shape(spec) \
                and full.is_contiguous():
            return [full]  # fresh memory in the target's shape already: splitting only copies it
        return [target.split(spec, full, r) for r in tp_ranks]

    def _row_blocks(self, param, tp_ranks: Sequence[int]) -> list[RowBlocks]:
        """Shards of a tensor TP splits on the vocab (word embeddings, output layer), as blocks of
        rows made when the writer takes them: the operators map rows independently (width maps
        act on the hidden dim), so neither the source's nor the target's whole tensor is made.
        Rows past the vocabulary are zero padding."""
        op, level, target, spec = self.plan.op, self.plan.level, self.plan.target, param.spec
        rows = functools.partial(self.source.read_rows, param.global_name)
        large_rows = functools.partial(self.large.read_rows, param.global_name) \
            if op == "interpolate" else None

        def mapped(start: int, count: int) -> torch.Tensor:
            block = rows(start, count)
            if op == "reshard":
                return block
            if op == "coalesce":
                return level.coalesce_tensor(spec, block)
            view = level.decoalesce_broadcast(spec, block) if op == "interpolate" else None
            decoalesced = level.decoalesce_tensor(spec, block) if view is None else view
            if op == "decoalesce":
                return decoalesced
            large = large_rows(start, count)  # fresh memory: mixed in place
            self._mix(large, decoalesced)
            return large

        shape, dtype = target.local_shape(spec), mapped(0, 0).dtype

        def blocks(tp_rank: int):
            start, _, keep = target.vocab_rows(tp_rank)
            for row in range(0, keep, _ROWS_PER_BLOCK):
                yield mapped(start + row, min(_ROWS_PER_BLOCK, keep - row))
            if keep < shape[0]:
                yield torch.zeros((shape[0] - keep, *shape[1:]), dtype=dtype)

        return [RowBlocks(shape, dtype, functools.partial(blocks, r)) for r in tp_ranks]

    def _interpolated(self, param, tp_ranks: Sequence[int]) -> list[torch.Tensor]:
        """interpolate is elementwise: each large shard (fresh memory of its own) takes the mix
        of its elements in place, which are the same values as mixing the full tensors and
        splitting (split moves data and pads zeros, and zeros mix to zeros).

        Where de-coalescing is a broadcast (regular schemes), each shard is mixed from a
        broadcast view of the small tensor restricted to the shard's elements, and no large
        de-coalesced tensor is made. Otherwise the de-coalesced full tensor is made once and
        split."""
        target, spec = self.plan.target, param.spec
        full, out = None, []
        for r, large in zip(tp_ranks, self._large_shards(param, tp_ranks)):
            view = None if full is not None else self._decoalesced_view(param, r)
            if view is not None:
                self._mix(large, view)
            else:
                full = self.mapped(param) if full is None else full
                interpolate_tensor(large, target.shard_of(spec, full, r), self.plan.alpha,
                                   out=large)
            out.append(large)
        return out

    def _decoalesced_view(self, param, tp_rank: int) -> Optional[torch.Tensor]:
        """Target rank ``tp_rank``'s shard of ``param`` de-coalesced, as a broadcast view (TP
        splits a width dim by units), or None where de-coalescing is not one broadcast."""
        spec, target = param.spec, self.plan.target
        block = None
        if spec.tp_dim is not None:
            units = target.cfg.num_query_groups // target.tp
            block = (spec.tp_dim, tp_rank * units, units)
        return self.plan.level.decoalesced_view(spec, param.layer, self._read_kept, block)

    def _mix(self, large: torch.Tensor, decoalesced: torch.Tensor) -> None:
        """Mix contiguous ``large`` in place with ``decoalesced`` (a broadcast view of the same
        elements, in ``large``'s reshape to its shape)."""
        region = large.view(decoalesced.shape)
        interpolate_tensor(region, decoalesced, self.plan.alpha, out=region)

    def _large_shards(self, param, tp_ranks: Sequence[int]):
        """The large checkpoint's shards of ``param`` for ``tp_ranks``, one at a time, each in fresh
        contiguous memory: read as stored when it is stored at the target layout (no gather),
        else split from the gathered tensor."""
        target, large = self.plan.target, self.large
        same = large.stores_shards_of(target)
        full = None if same else large.read(param.global_name)
        for r in tp_ranks:
            yield large.read_shard(param.global_name, r) if same else \
                target.split(param.spec, full, r)


def _vocab_split(spec) -> bool:
    """Whether TP splits ``spec`` on the vocab (dim 0 of the embeddings and the output layer)."""
    return spec.tp_dim == 0 and spec.dims[0] == "vocab"


def pp_stage_tensors(plan: ConversionPlan, pp_rank: int, tp_ranks: Sequence[int]):
    """Yield (local name, [shard per rank of ``tp_ranks``]) for every tensor of target stage
    ``pp_rank``, one parameter at a time.

    Each yielded list holds fresh memory that the generator does not keep: once the consumer drops
    it, it is freed. Shards may be :class:`RowBlocks`, whose blocks are made (from the source
    checkpoints, which allow this from another thread) when the consumer iterates them.
    """
    producer = _Producer(plan)
    for param in plan.target.pp_stage_params(pp_rank):
        out = [producer.shards(param, tp_ranks)]
        yield param.local_name, out.pop()  # hold no tensor while suspended at the yield


def rank_tensors(plan: ConversionPlan, tp_rank: int, pp_rank: int):
    """Yield (local name, tensor) for every tensor target rank (tp_rank, pp_rank) holds, one at a
    time (see :func:`pp_stage_tensors`): what training loads when it starts from another level."""
    for name, shards in pp_stage_tensors(plan, pp_rank, [tp_rank]):
        yield name, materialized(shards.pop())
