"""Megatron's naming facts: block names, the architecture a state dict's keys show, the modules that
carry ``_extra_state``, the tied output copy, and parameter names in either layer spec (local, TE)."""

from __future__ import annotations

from typing import Iterable, Optional

from mlmega.config.model import ModelConfig

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
# The shared-embedding copy held by the last stage when tied embeddings meet PP > 1.
TIED_OUTPUT = "output_layer.weight"
OUTPUT_LAYER = "output_layer"
TRANSFORMER_IMPLS = ("local", "transformer_engine")
# TE's TELayerNormColumnParallelLinear holds the norm before it (megatron-core's
# get_gpt_layer_with_transformer_engine_spec / get_bert_layer_with_transformer_engine_spec; also
# the keys both specs use in torch_dist checkpoints).
TE_FUSED_NORMS = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                  ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))
# Per-layer modules with an ``_extra_state`` entry: megatron's parallel linears in both specs, and
# TE's TEDotProductAttention.
_EXTRA_STATE = {"local": ("self_attention.linear_qkv", "self_attention.linear_proj",
                          "mlp.linear_fc1", "mlp.linear_fc2"),
                "transformer_engine": ("self_attention.linear_qkv", "self_attention.core_attention",
                                       "self_attention.linear_proj", "mlp.linear_fc1",
                                       "mlp.linear_fc2")}
# Top-level prefixes of a GPT/BERT model's keys (the rest of a checkpoint is optimizer state).
MODEL_PREFIXES = ("embedding.", "decoder.", "encoder.", "output_layer.", "lm_head.", "pooler.",
                  "binary_head.")


def block_name(cfg: ModelConfig) -> str:
    """The transformer block's module name: GPTModel's ``decoder``, BertModel's ``encoder``."""
    return "decoder" if cfg.arch == "gpt" else "encoder"


def arch_from_keys(keys: Iterable[str]) -> Optional[str]:
    """"bert" or "gpt" from a state dict's keys; None when they do not tell."""
    keys = list(keys)
    if any(k.startswith(("encoder.", "lm_head.")) for k in keys):
        return "bert"
    if any(k.startswith("decoder.") for k in keys):
        return "gpt"
    return None



def impl_name(name: str, transformer_impl: str) -> str:
    """``name`` (local spec) as the model built with ``transformer_impl`` calls it."""
    if transformer_impl == "local":
        return name
    for local, fused in TE_FUSED_NORMS:
        head, sep, tail = name.partition(".layers.")
        if sep:
            layer, _, rest = tail.partition(".")
            if rest.startswith(local):
                return f"{head}.layers.{layer}.{fused}{rest[len(local):]}"
    return name


def local_name(name: str) -> str:
    """The local-spec name of a parameter named in either layout (inverse of :func:`impl_name`)."""
    head, sep, tail = name.partition(".layers.")
    if sep:
        layer, _, rest = tail.partition(".")
        for local, fused in TE_FUSED_NORMS:
            if rest.startswith(fused):
                return f"{head}.layers.{layer}.{local}{rest[len(fused):]}"
    return name


def transformer_impl_of(names) -> str:
    """The layout a state dict's parameter names are in (TE's fused norm names, or local)."""
    fused = tuple(f".{new}" for _, new in TE_FUSED_NORMS)
    return "transformer_engine" if any(fused[0] in n or fused[1] in n for n in names) else "local"


def extra_state_modules(transformer_impl: str) -> tuple[str, ...]:
    """Per-layer modules (after ``<block>.layers.<i>.``) whose state dict has ``_extra_state``."""
    return _EXTRA_STATE[transformer_impl]
