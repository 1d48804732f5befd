"""Build the real megatron-core ``GPTModel`` / ``BertModel`` for a ``ModelConfig``.

Uses megatron-core's local (non-TransformerEngine) layer specs with :class:`SDPAttention` as the
core attention, so the same model runs on CPU (gloo) and GPU. megatron's parallel state must be
initialised first (see :mod:`mlmega.parallel`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as nnf

from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from mlmega.config.model import ModelConfig
from mlmega.models.attention import SDPAttention


def transformer_config(cfg: ModelConfig, tp: int = 1, pp: int = 1,
                       dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """megatron-core TransformerConfig for ``cfg`` at tensor/pipeline parallel sizes tp, pp."""
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=cfg.gated,
        activation_func=nnf.silu if cfg.gated else nnf.gelu,
        add_bias_linear=cfg.add_bias_linear,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def layer_spec(cfg: ModelConfig) -> ModuleSpec:
    """The local megatron-core layer spec for ``cfg`` with SDPA core attention plugged in."""
    if cfg.arch == "gpt":
        spec = get_gpt_layer_local_spec(normalization=cfg.normalization)
    else:
        spec = copy.deepcopy(bert_layer_local_spec)
        if cfg.normalization == "RMSNorm":
            spec = _bert_spec_with_norm(spec, get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def _bert_spec_with_norm(spec: ModuleSpec, donor: ModuleSpec) -> ModuleSpec:
    spec.submodules.input_layernorm = donor.submodules.input_layernorm
    spec.submodules.pre_mlp_layernorm = donor.submodules.pre_mlp_layernorm
    return spec


def build_model(cfg: ModelConfig, tp: int = 1, pp: int = 1, pre_process: bool = True,
                post_process: bool = True, dtype: torch.dtype = torch.float32):
    """A megatron-core model for this rank (pre/post_process: first/last pipeline stage)."""
    common = dict(
        config=transformer_config(cfg, tp, pp, dtype),
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=cfg.padded_vocab_size(tp),
        max_sequence_length=cfg.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=cfg.position_embedding,
    )
    if cfg.arch == "gpt":
        model = GPTModel(rotary_base=cfg.rotary_base, **common)
    else:
        model = SDPABertModel(num_tokentypes=cfg.num_tokentypes,
                              add_binary_head=cfg.bert_binary_head, **common)
    # params_dtype covers the linear layers only; norms and position embeddings stay fp32 unless
    # the whole module is cast (Megatron-LM's Float16Module does the same).
    return model if dtype == torch.float32 else model.to(dtype)


class SDPABertModel(BertModel):
    """megatron-core's BertModel with a key-padding mask [b, 1, 1, s] for :class:`SDPAttention`.

    BertModel picks the mask layout by recognising its own core attention classes only; a
    [b, 1, s, s] mask would leave padded query rows with nothing to attend to (NaN in SDPA).
    """

    def _sanity_check_attention_and_get_attn_mask_dimension(self) -> str:
        return "b11s"
