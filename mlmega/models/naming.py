"""Megatron's naming facts: block names, the architecture a state dict's keys show, the modules that
carry ``_extra_state``, and the tied output copy."""

from __future__ import annotations

from typing import Iterable, Optional

from mlmega.config.model import ModelConfig

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
# The shared-embedding copy held by the last stage when tied embeddings meet PP > 1.
TIED_OUTPUT = "output_layer.weight"
OUTPUT_LAYER = "output_layer"
# Per-layer modules that carry an ``_extra_state`` entry (megatron's parallel linears).
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv",
                       "mlp.linear_fc1", "mlp.linear_fc2")
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


def has_extra_state(module: str) -> bool:
    """Whether megatron's module ``module`` (a full dotted name) has an ``_extra_state`` entry."""
    return module == OUTPUT_LAYER or module.endswith(tuple(f".{m}" for m in EXTRA_STATE_MODULES))
