"""Shared test helpers: small model configs for the variant matrix, random states, forward passes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from mlmega.checkpoint.integrity import zip_records
from mlmega.config.model import ModelConfig
from mlmega.models.build import build_model
from mlmega.models.state import StateDict, full_state_dict, load_full_state_dict

HEAD_DIM = 8
VOCAB = 100
SEQ = 16

# Each option appears in at least two variants (MHA/GQA, gelu/swiglu, tied/untied, learned/rope,
# LayerNorm/RMSNorm, bias/no bias; BERT with/without binary head, tied/untied).
VARIANTS: dict[str, dict] = {
    "gpt-mha-gelu-tied-abs-ln-bias": dict(arch="gpt"),
    "gpt-mha-gelu-untied-abs-ln-bias": dict(arch="gpt", tie_embeddings=False),
    "gpt-gqa-swiglu-untied-rope-rms-nobias": dict(
        arch="gpt", gqa=True, activation="swiglu", tie_embeddings=False,
        position_embedding="rope", normalization="RMSNorm", add_bias_linear=False),
    "gpt-gqa-swiglu-tied-rope-rms-bias": dict(
        arch="gpt", gqa=True, activation="swiglu", position_embedding="rope",
        normalization="RMSNorm"),
    "gpt-mha-swiglu-untied-abs-rms-nobias": dict(
        arch="gpt", activation="swiglu", tie_embeddings=False, normalization="RMSNorm",
        add_bias_linear=False),
    "gpt-gqa-gelu-untied-rope-ln-bias": dict(
        arch="gpt", gqa=True, tie_embeddings=False, position_embedding="rope"),
    "bert-tied-binary": dict(arch="bert", bert_binary_head=True),
    "bert-untied-binary": dict(arch="bert", bert_binary_head=True, tie_embeddings=False),
    "bert-tied-nobinary": dict(arch="bert"),
    "bert-untied-nobinary-rms-nobias": dict(
        arch="bert", tie_embeddings=False, normalization="RMSNorm", add_bias_linear=False),
}
UNTIED = [name for name in VARIANTS if "untied" in name]
TIED = [name for name in VARIANTS if "untied" not in name]


def variant(name: str, units: int = 2, layers: int = 2) -> ModelConfig:
    """Variant ``name`` with ``units`` width units (query groups; GQA has 2 heads per group)."""
    options = dict(VARIANTS[name])
    heads = units * (2 if options.pop("gqa", False) else 1)
    return ModelConfig(num_layers=layers, hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                       num_query_groups=units, ffn_hidden_size=12 * units, vocab_size=VOCAB,
                       max_sequence_length=SEQ, **options)


def make_model_state(cfg: ModelConfig, seed: int) -> StateDict:
    """A real model's state dict with every tensor randomised (non-trivial biases and norms too)."""
    state = full_state_dict(build_model(cfg))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
        if "norm" in name and name.endswith("weight"):
            out[name] = 1.0 + 0.2 * noise
        elif tensor.dim() == 1:
            out[name] = 0.1 * noise
        else:
            out[name] = 0.2 * noise
    return out


def init_model_state(cfg: ModelConfig, seed: int) -> StateDict:
    """The state of a freshly built model with megatron-core's own initialisation (std 0.02)."""
    torch.manual_seed(seed)
    return full_state_dict(build_model(cfg))


def token_ids(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def forward_logits(cfg: ModelConfig, state: StateDict, ids: torch.Tensor,
                   mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """Forward a real megatron-core model of ``cfg`` holding ``state``: (logits[, binary_logits]).

    GPT: causal LM logits [b, s, padded_vocab]. BERT: ``mask`` [b, s] bool, True = real token
    (all real when None); returns the binary-head logits too when the model has one.
    """
    model = build_model(cfg)
    load_full_state_dict(model, state)
    model.eval()
    with torch.no_grad():
        if cfg.arch == "gpt":
            positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
            out = model(ids, positions, attention_mask=None)
        else:
            mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
            types = torch.zeros_like(ids) if cfg.num_tokentypes > 0 else None
            out = model(ids, mask, tokentype_ids=types)
    outputs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return tuple(o for o in outputs if o is not None)  # BERT without binary head: (logits, None)


def file_records(path: Path) -> dict:
    """The zip records of file ``path`` (name -> offset, length, CRC32), as mlmega's checks read
    them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return zip_records(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def flip_byte(path: Path, offset: int) -> None:
    """Damage ``path`` in place: one bit of the byte at ``offset`` flipped."""
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0x40]))
