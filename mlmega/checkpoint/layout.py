"""How tensor and pipeline parallelism shard a model: :class:`ShardLayout`.

Reads the parameter table (:mod:`mlmega.models.params`) only. TP splits a tensor on the dim the
table names, along that dim's unit-major axis (fused QKV: whole query groups; SwiGLU fc1: the F axis
of [gate; up], so each rank holds [gate_r; up_r]). The vocab dim is padded per TP size: gathering
keeps the rows of the TP=1 padded vocabulary (the canonical full tensor, what a TP=1 model holds);
splitting pads with zero rows to the target's padded size. A layout's padded size is Megatron's rule
(``make_vocab_size_divisible_by * tp``), or, for a checkpoint read, the size its shards have (the
truth of the files: Megatron's converter keeps a source's padding when it changes the TP size).
PP gives each stage a contiguous block of layers numbered locally, the embeddings to the first
stage, the final norm and heads to the last and, with tied embeddings and PP > 1, the last stage
its own ``output_layer.weight`` copy. Local names follow the layout's ``transformer_impl`` (TE's
fused layer-norm names, or local's); global names are always the parameter table's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig
from mlmega.models.naming import TIED_OUTPUT, TRANSFORMER_IMPLS, WORD_EMBEDDINGS, impl_name
from mlmega.models.params import FIRST, LAST, ParamSpec, parameter_table, space_layout


@dataclass(frozen=True)
class LocalParam:
    """One tensor as a rank holds it: its local name, the global name it is a shard of, its spec."""

    local_name: str
    global_name: str
    spec: ParamSpec
    layer: Optional[int]  # global layer index for per-layer parameters


@dataclass(frozen=True)
class ShardLayout:
    """A model config at tensor-parallel size ``tp`` and pipeline-parallel size ``pp``."""

    cfg: ModelConfig
    tp: int = 1
    pp: int = 1
    layers_per_pp_stage: Optional[tuple[int, ...]] = None  # None: an even split
    padded_vocab: Optional[int] = None  # vocab rows over all TP ranks; None: Megatron's rule
    transformer_impl: str = "local"  # the layer spec whose parameter names the shards use

    def __post_init__(self) -> None:
        cfg, tp, pp = self.cfg, self.tp, self.pp
        if tp < 1 or pp < 1:
            raise ConfigError(f"TP={tp}, PP={pp}: expected positive sizes")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError(f"transformer_impl={self.transformer_impl!r}: expected one of "
                              f"{TRANSFORMER_IMPLS}")
        if self.padded_vocab is None:
            object.__setattr__(self, "padded_vocab", cfg.padded_vocab_size(tp))
        elif self.padded_vocab % tp or self.padded_vocab < cfg.vocab_size:
            raise ConfigError(f"{cfg.source}: padded vocabulary of {self.padded_vocab} rows: "
                              f"expected a multiple of TP={tp} of at least vocab_size="
                              f"{cfg.vocab_size}")
        for what, value in (("num_attention_heads", cfg.num_attention_heads),
                            ("num_query_groups", cfg.num_query_groups),
                            ("ffn_hidden_size", cfg.ffn_hidden_size)):
            if value % tp:
                raise ConfigError(f"{cfg.source}: {what}={value} is not divisible by TP={tp}")
        stages = self.layers_per_pp_stage
        if stages is None:
            if cfg.num_layers % pp:
                raise ConfigError(f"{cfg.source}: num_layers={cfg.num_layers} is not divisible by "
                                  f"PP={pp}; give layers_per_pp_stage for an uneven split")
            object.__setattr__(self, "layers_per_pp_stage", (cfg.num_layers // pp,) * pp)
        elif len(stages) != pp or sum(stages) != cfg.num_layers or min(stages) < 1:
            raise ConfigError(f"layers_per_pp_stage={list(stages)}: expected {pp} positive counts "
                              f"summing to num_layers={cfg.num_layers}")
        elif len(set(stages[1:-1])) > 1:  # Megatron's args name the first and last stage only
            raise ConfigError(f"layers_per_pp_stage={list(stages)}: the stages between the first "
                              f"and the last must hold equal numbers of layers (Megatron's "
                              f"decoder_first/last_pipeline_num_layers)")

    # -- pipeline placement -------------------------------------------------------------------
    @property
    def ranks(self) -> list[tuple[int, int]]:
        """All (tp_rank, pp_rank) pairs, pipeline stage major."""
        return [(t, p) for p in range(self.pp) for t in range(self.tp)]

    def pp_stage_layers(self, pp_rank: int) -> range:
        start = sum(self.layers_per_pp_stage[:pp_rank])
        return range(start, start + self.layers_per_pp_stage[pp_rank])

    def pp_stage_params(self, pp_rank: int) -> Iterator[LocalParam]:
        """The parameters pipeline stage ``pp_rank`` holds, with local layer numbering."""
        first, last = pp_rank == 0, pp_rank == self.pp - 1
        table = parameter_table(self.cfg)
        for spec in table:
            if spec.per_layer:
                for local, layer in enumerate(self.pp_stage_layers(pp_rank)):
                    yield LocalParam(self.local_name(spec, local), spec.name(layer), spec, layer)
            elif (spec.pp_stage == FIRST and first) or (spec.pp_stage == LAST and last):
                yield LocalParam(spec.template, spec.template, spec, None)
        if self.cfg.tie_embeddings and last and not first:
            embedding = next(s for s in table if s.template == WORD_EMBEDDINGS)
            yield LocalParam(TIED_OUTPUT, WORD_EMBEDDINGS, embedding, None)

    def local_name(self, spec: ParamSpec, local_layer: Optional[int] = None) -> str:
        """The name a pp stage's model gives ``spec`` (at local layer index ``local_layer``)."""
        return impl_name(spec.name(local_layer), self.transformer_impl)

    def pp_stage_of_layer(self, layer: int) -> int:
        for pp_rank in range(self.pp):
            if layer in self.pp_stage_layers(pp_rank):
                return pp_rank
        raise IndexError(f"layer {layer} is outside the model's {self.cfg.num_layers} layers")

    # -- tensor parallel split / gather -------------------------------------------------------
    def _tp_view(self, spec: ParamSpec, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        """View ``tensor`` so that TP splits axis ``k`` of the result contiguously."""
        dim = spec.tp_dim
        lead, _ = space_layout(self.cfg, spec.dims[dim])
        shape = tensor.shape
        return tensor.reshape(*shape[:dim], lead, shape[dim] // lead, *shape[dim + 1:]), dim + 1

    def split(self, spec: ParamSpec, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
        """The shard of canonical full tensor ``full`` that TP rank ``tp_rank`` holds (a copy)."""
        return self.shard_of(spec, full, tp_rank).clone(memory_format=torch.contiguous_format)

    def shard_of(self, spec: ParamSpec, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
        """Like :meth:`split`, but a view of ``full`` where the shard's layout allows one."""
        if spec.tp_dim is None:
            return full
        dim = spec.tp_dim
        if spec.dims[dim] == "vocab":  # contiguous row blocks of the vocab padded for this TP size
            start, rows, keep = self.vocab_rows(tp_rank)
            if keep == rows:
                return full.narrow(dim, start, rows)
            shape = list(full.shape)
            shape[dim] = rows
            shard = full.new_zeros(shape)  # the padding rows past the vocabulary stay zero
            if keep:  # a rank may hold padding rows only
                shard.narrow(dim, 0, keep).copy_(full.narrow(dim, start, keep))
            return shard
        view, axis = self._tp_view(spec, full)
        shard = view.chunk(self.tp, dim=axis)[tp_rank]
        shape = list(full.shape)
        shape[dim] //= self.tp
        return shard.reshape(shape)

    def zero_padding(self, spec: ParamSpec, shard: torch.Tensor, tp_rank: int) -> torch.Tensor:
        """Zero, in place, the rows of stored shard ``shard`` past the canonical (TP=1 padded)
        vocabulary: the rows :meth:`split` pads with zeros. Returns ``shard``."""
        if spec.tp_dim is None or spec.dims[spec.tp_dim] != "vocab":
            return shard
        _, rows, keep = self.vocab_rows(tp_rank)
        if keep < rows:
            shard.narrow(spec.tp_dim, keep, rows - keep).zero_()
        return shard

    def vocab_rows(self, tp_rank: int) -> tuple[int, int, int]:
        """(start, rows, keep): TP rank ``tp_rank``'s vocab shard holds rows [start, start + rows)
        of the vocabulary padded for this TP size; the first ``keep`` of them are rows of the
        canonical (TP=1 padded) one, the others zero padding."""
        rows = self.padded_vocab // self.tp
        start = tp_rank * rows
        return start, rows, max(0, min(rows, self.cfg.padded_vocab_size(1) - start))

    def gather(self, spec: ParamSpec, shards: Sequence[torch.Tensor],
               fill: Optional[Callable[[torch.Tensor, int], None]] = None) -> torch.Tensor:
        """The canonical full tensor (TP=1 layout and padded vocab) from all TP ranks' shards, in
        fresh memory. ``fill(region, r)`` puts shard ``r``'s values into ``region``, the view of the
        result (in the split's geometry) where they belong; by default copied from ``shards[r]``,
        a reader may write file bytes there directly."""
        if len(shards) != self.tp:
            raise ValueError(f"expected {self.tp} shards, got {len(shards)}")
        if fill is None:
            def fill(region: torch.Tensor, r: int) -> None:
                region.copy_(shards[r].reshape(region.shape))
        shape = list(shards[0].shape)
        if spec.tp_dim is not None:
            shape[spec.tp_dim] *= self.tp
        full = torch.empty(shape, dtype=shards[0].dtype)
        if spec.tp_dim is None:
            fill(full, 0)
            return full
        view, axis = self._tp_view(spec, full)
        for r, region in enumerate(view.chunk(self.tp, dim=axis)):
            fill(region, r)
        if spec.dims[spec.tp_dim] == "vocab":
            full = pad_rows(full, spec.tp_dim, self.cfg.padded_vocab_size(1))
        return full

    def local_shape(self, spec: ParamSpec) -> tuple[int, ...]:
        shape = [self.padded_vocab if s == "vocab" else math.prod(space_layout(self.cfg, s))
                 for s in spec.dims]
        if spec.tp_dim is not None:
            shape[spec.tp_dim] //= self.tp
        return tuple(shape)

    def global_shape(self, spec: ParamSpec) -> tuple[int, ...]:
        """The TP-gathered shape as stored at this layout (the vocab padded for it)."""
        shape = list(self.local_shape(spec))
        if spec.tp_dim is not None:
            shape[spec.tp_dim] *= self.tp
        return tuple(shape)

    def megatron_args(self, dtype: torch.dtype = torch.float32) -> dict:
        """The args Megatron-LM saves for this model at this layout with parameters of ``dtype``
        (model args, parallel sizes, padded vocabulary, precision; tokenizer: mlmega's Hugging
        Face tokenizer, unless :data:`TOKENIZER_ARGS` of a source are given instead)."""
        args = self.cfg.to_megatron_args()
        uneven = len(set(self.layers_per_pp_stage)) > 1
        args.update(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                    virtual_pipeline_model_parallel_size=None,
                    num_layers_per_virtual_pipeline_stage=None, expert_model_parallel_size=1,
                    decoder_first_pipeline_num_layers=self.layers_per_pp_stage[0] if uneven else None,
                    decoder_last_pipeline_num_layers=self.layers_per_pp_stage[-1] if uneven else None,
                    padded_vocab_size=self.padded_vocab, fp16=dtype == torch.float16,
                    bf16=dtype == torch.bfloat16, params_dtype=dtype,
                    tokenizer_type="HuggingFaceTokenizer", tokenizer_model=None,
                    consumed_train_samples=0, consumed_valid_samples=0,
                    transformer_impl=self.transformer_impl)
        if self.cfg.arch == "bert" and self.transformer_impl == "transformer_engine":
            args.update(spec=None)  # pretrain_bert.py: its TE spec
        return args


# The tokenizer a checkpoint's args name: a conversion carries them from its source.
TOKENIZER_ARGS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file",
                  "vocab_extra_ids", "tiktoken_pattern")


def tokenizer_args(args) -> dict:
    """The :data:`TOKENIZER_ARGS` that ``args`` (a Megatron args namespace, or None) set."""
    return {k: getattr(args, k) for k in TOKENIZER_ARGS if getattr(args, k, None) is not None}


def pad_rows(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Trim or zero-pad ``tensor`` along ``dim`` to ``size`` rows."""
    have = tensor.shape[dim]
    if have >= size:
        return tensor.narrow(dim, 0, size)
    pad_shape = list(tensor.shape)
    pad_shape[dim] = size - have
    return torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
