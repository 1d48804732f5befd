"""The parameter table: every megatron-core parameter of a GPT/BERT, described once.

Each :class:`ParamSpec` row says, for one parameter name template (``{}`` = layer index), which
*space* each tensor dim indexes, how the width operators treat that dim (``out``: it carries the
parameter's output, averaged on coalescing and duplicated on de-coalescing; ``in``: it consumes an
input, summed on coalescing and split on de-coalescing), which dim tensor parallelism splits, and on
which pipeline stage the parameter lives. TP splitting, PP placement, gathering and the operators
all read this table.

Spaces and their layouts (``N`` = the unit-major length that TP splits and the width scheme groups):
  embed      (D,)                  hidden size; U chunks of D/U
  qkv        (G * (H/G + 2) * hd,) fused QKV rows, group after group: [q heads | k | v] per group
  heads      (H * hd,)             attention context (proj input), group-major
  ffn        (F,)                  FFN hidden
  ffn_gated  (2, F)                SwiGLU fc1 rows [gate; up]; TP/width act on the F axis
  vocab, positions, tokentypes, binary: not width-scaled (vocab is TP-split with padding)
U = number of query groups (= heads for MHA): the unit a width scheme groups.

Names are those of megatron-core's local layer spec; :mod:`mlmega.models.naming` gives them in its
TransformerEngine spec, which fuses each layer norm into the linear after it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Optional

from mlmega.config.model import ModelConfig
from mlmega.models.naming import block_name

WIDTH_SPACES = ("embed", "qkv", "heads", "ffn", "ffn_gated")
OUT, IN = "out", "in"
FIRST, LAST, LAYER = "first", "last", "layer"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter (template) of a megatron-core model and how every concern must treat it."""

    template: str  # e.g. "decoder.layers.{}.mlp.linear_fc1.weight"
    dims: tuple[str, ...]  # the space each tensor dim indexes
    sides: tuple[Optional[str], ...]  # width side per dim: OUT, IN or None (not width-scaled)
    tp_dim: Optional[int] = None  # tensor dim split across TP ranks; None = replicated
    pp_stage: str = LAYER  # FIRST / LAST pipeline stage, or LAYER (per transformer layer)
    residual: bool = False  # adds into the residual stream (attention proj, FFN fc2)

    @property
    def per_layer(self) -> bool:
        return self.pp_stage == LAYER

    def name(self, layer: Optional[int] = None) -> str:
        return self.template.format(layer) if self.per_layer else self.template


def space_layout(cfg: ModelConfig, space: str, tp: int = 1) -> tuple[int, int]:
    """(lead, N): a dim of ``space`` has lead * N elements laid out as [lead, N]."""
    hd, heads, groups = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    sizes = {
        "embed": cfg.hidden_size,
        "qkv": groups * (heads // groups + 2) * hd,
        "heads": heads * hd,
        "ffn": cfg.ffn_hidden_size,
        "ffn_gated": cfg.ffn_hidden_size,
        "vocab": cfg.padded_vocab_size(tp),
        "positions": cfg.max_sequence_length,
        "tokentypes": cfg.num_tokentypes,
        "binary": 2,
    }
    return (2 if space == "ffn_gated" else 1), sizes[space]


def space_size(cfg: ModelConfig, space: str, tp: int = 1) -> int:
    lead, length = space_layout(cfg, space, tp)
    return lead * length


def parameter_table(cfg: ModelConfig) -> list[ParamSpec]:
    """The rows for ``cfg``: only the parameters this configuration actually has."""
    block = block_name(cfg)
    layer = f"{block}.layers.{{}}."
    emb_side = IN if cfg.tie_embeddings else OUT  # tied: the embedding is also the LM head's input map
    has_norm_bias = cfg.normalization == "LayerNorm"
    bias = cfg.add_bias_linear
    fc1_space = "ffn_gated" if cfg.gated else "ffn"
    rows: list[ParamSpec] = []

    def add(template, dims, sides, tp_dim=None, pp_stage=LAYER, when=True, residual=False):
        if when:
            rows.append(ParamSpec(template, tuple(dims), tuple(sides), tp_dim, pp_stage, residual))

    def norm(prefix, pp_stage):
        add(prefix + ".weight", ["embed"], [OUT], pp_stage=pp_stage)
        add(prefix + ".bias", ["embed"], [OUT], pp_stage=pp_stage, when=has_norm_bias)

    add("embedding.word_embeddings.weight", ["vocab", "embed"], [None, emb_side], 0, FIRST)
    add("embedding.position_embeddings.weight", ["positions", "embed"], [None, emb_side], None,
        FIRST, when=cfg.position_embedding == "learned_absolute")
    add("embedding.tokentype_embeddings.weight", ["tokentypes", "embed"], [None, emb_side], None,
        FIRST, when=cfg.arch == "bert" and cfg.num_tokentypes > 0)

    norm(layer + "input_layernorm", LAYER)
    add(layer + "self_attention.linear_qkv.weight", ["qkv", "embed"], [OUT, IN], 0)
    add(layer + "self_attention.linear_qkv.bias", ["qkv"], [OUT], 0, when=bias)
    add(layer + "self_attention.linear_proj.weight", ["embed", "heads"], [OUT, IN], 1,
        residual=True)
    add(layer + "self_attention.linear_proj.bias", ["embed"], [OUT], when=bias, residual=True)
    norm(layer + "pre_mlp_layernorm", LAYER)
    add(layer + "mlp.linear_fc1.weight", [fc1_space, "embed"], [OUT, IN], 0)
    add(layer + "mlp.linear_fc1.bias", [fc1_space], [OUT], 0, when=bias)
    add(layer + "mlp.linear_fc2.weight", ["embed", "ffn"], [OUT, IN], 1, residual=True)
    add(layer + "mlp.linear_fc2.bias", ["embed"], [OUT], when=bias, residual=True)
    norm(f"{block}.final_layernorm", LAST)

    if cfg.arch == "bert":
        add("lm_head.dense.weight", ["embed", "embed"], [OUT, IN], pp_stage=LAST)
        add("lm_head.dense.bias", ["embed"], [OUT], pp_stage=LAST)
        norm("lm_head.layer_norm", LAST)
        add("output_layer.bias", ["vocab"], [None], 0, LAST)
        if cfg.bert_binary_head:
            add("pooler.dense.weight", ["embed", "embed"], [OUT, IN], pp_stage=LAST)
            add("pooler.dense.bias", ["embed"], [OUT], pp_stage=LAST)
            add("binary_head.weight", ["binary", "embed"], [None, IN], pp_stage=LAST)
            add("binary_head.bias", ["binary"], [None], pp_stage=LAST)
    add("output_layer.weight", ["vocab", "embed"], [None, IN], 0, LAST, when=not cfg.tie_embeddings)
    return rows


def iter_params(cfg: ModelConfig) -> Iterator[tuple[str, ParamSpec, Optional[int]]]:
    """(name, spec, layer) for every parameter of the full model, in model order."""
    for spec in parameter_table(cfg):
        if spec.per_layer:
            for layer in range(cfg.num_layers):
                yield spec.name(layer), spec, layer
        else:
            yield spec.name(), spec, None


@functools.lru_cache(maxsize=8)
def param_index(cfg: ModelConfig) -> dict[str, tuple[ParamSpec, Optional[int]]]:
    """Name -> (spec, layer) of every parameter of the full model (cached: read-only)."""
    return {name: (spec, layer) for name, spec, layer in iter_params(cfg)}


def global_shape(cfg: ModelConfig, spec: ParamSpec, tp: int = 1) -> tuple[int, ...]:
    """The full (TP-gathered) shape; the vocab dim is padded for TP size ``tp``."""
    return tuple(space_size(cfg, space, tp) for space in spec.dims)


def param_shapes(cfg: ModelConfig, tp: int = 1) -> dict[str, tuple[int, ...]]:
    """Name -> global shape of every parameter (vocab padded for TP size ``tp``)."""
    return {name: global_shape(cfg, spec, tp) for name, spec, _ in iter_params(cfg)}


def num_parameters(cfg: ModelConfig) -> int:
    """Parameter count of the unpadded model (vocab rows counted once, tied output not counted)."""
    total = 0
    for name, spec, _ in iter_params(cfg):
        count = 1
        for space in spec.dims:
            count *= cfg.vocab_size if space == "vocab" else space_size(cfg, space)
        total += count
    return total
