"""A megatron-core core attention built on ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` allocates its score buffer on CUDA; this module has the
same constructor and forward contract (query [sq, b, heads, hd], key/value [sk, b, groups, hd],
output [sq, b, heads*hd]) and runs on CPU and GPU alike without TransformerEngine.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as nnf

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """Causal or padding-masked attention over the heads of this tensor-parallel rank."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor biases")
        sq, b, heads, hd = query.shape
        groups = key.shape[2]
        if heads != groups:  # GQA: each query group's K/V serves heads // groups query heads
            key = key.repeat_interleave(heads // groups, dim=2)
            value = value.repeat_interleave(heads // groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hd]
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask.bool()  # megatron: True = masked out; SDPA: True = attend
        dropout = self.dropout if self.training else 0.0
        # As megatron's DotProductAttention: each TP rank holds other heads, so their dropout
        # masks come from the tracker's per-TP-rank stream (the default one under SP).
        streams = nullcontext() if not dropout or self.config.sequence_parallel else \
            tensor_parallel.get_cuda_rng_tracker().fork()
        with streams:
            context = nnf.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                       is_causal=causal, scale=self.softmax_scale)
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * hd)
