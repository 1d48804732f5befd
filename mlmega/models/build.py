"""Build the real megatron-core ``GPTModel`` / ``BertModel`` for a ``ModelConfig``.

The layer spec follows the run's resolved :class:`PerformanceConfig`: megatron-core's
TransformerEngine spec (``transformer_engine``; GPU with TE only), or its local spec with
:class:`SDPAttention` as the core attention (``local``; CPU/gloo and GPU). The same config carries
sequence parallelism, activation recomputation and the fused kernels. megatron's parallel state
must be initialised first (see :mod:`mlmega.parallel`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as nnf

from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                      get_gpt_layer_with_transformer_engine_spec)
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_config import TransformerConfig

from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig
from mlmega.config.performance import PerformanceConfig, has_fused_kernels
from mlmega.models.attention import SDPAttention
from mlmega.models.norms import SequenceParallelNorm

LOCAL = PerformanceConfig(transformer_impl="local", distributed_optimizer=False,
                          overlap_grad_reduce=False, overlap_param_gather=False,
                          sequence_parallel=False, recompute="none", fused_kernels=False)


def transformer_config(cfg: ModelConfig, tp: int = 1, pp: int = 1,
                       dtype: torch.dtype = torch.float32,
                       perf: PerformanceConfig = LOCAL) -> TransformerConfig:
    """megatron-core TransformerConfig for ``cfg`` at tensor/pipeline parallel sizes tp, pp, with
    the switches of ``perf`` (resolved: no ``auto`` left)."""
    fused = bool(perf.fused_kernels)
    te = perf.transformer_impl == "transformer_engine"
    recompute = {"none": {}, "selective": dict(recompute_granularity="selective"),
                 "full": dict(recompute_granularity="full", recompute_method="uniform",
                              recompute_num_layers=1)}[perf.recompute]
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
        use_cpu_initialization=not torch.cuda.is_available(),
        sequence_parallel=bool(perf.sequence_parallel),
        # Fusions that keep the model's math: SwiGLU's (megatron's fused GELU is tanh-approximate),
        # TE's fused RoPE and wgrad accumulation (the local linears' needs apex's CUDA extension).
        bias_activation_fusion=fused and cfg.gated,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        persist_layer_norm=False,
        apply_rope_fusion=fused and te and cfg.position_embedding == "rope",
        gradient_accumulation_fusion=fused and te,
        **recompute,
    )


def layer_spec(cfg: ModelConfig, transformer_impl: str = "local") -> ModuleSpec:
    """megatron-core's layer spec for ``cfg``: TransformerEngine's, or the local one with SDPA
    core attention plugged in."""
    if transformer_impl == "transformer_engine":
        if cfg.arch == "gpt":
            return get_gpt_layer_with_transformer_engine_spec()
        from megatron.core.models.bert.bert_layer_specs import \
            get_bert_layer_with_transformer_engine_spec
        return get_bert_layer_with_transformer_engine_spec()
    if cfg.arch == "gpt":
        spec = get_gpt_layer_local_spec(normalization=cfg.normalization)
    else:
        spec = copy.deepcopy(bert_layer_local_spec)
        if cfg.normalization == "RMSNorm":
            spec = _bert_spec_with_norm(spec, get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def _sequence_parallel_block(cfg: ModelConfig, config: TransformerConfig,
                             spec: ModuleSpec) -> TransformerBlockSubmodules:
    """The local spec's layers (and the block's final norm) with norms that run under sequence
    parallelism (see :mod:`mlmega.models.norms`)."""
    if cfg.arch != "gpt" and not has_fused_kernels():
        raise ConfigError("performance.sequence_parallel for BERT needs TransformerEngine or apex "
                          "(megatron-core's BertLMHead builds its torch LayerNorm, which refuses "
                          "sequence parallelism); set it to false")
    spec = copy.deepcopy(spec)
    spec.submodules.input_layernorm = SequenceParallelNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelNorm)


def _bert_spec_with_norm(spec: ModuleSpec, donor: ModuleSpec) -> ModuleSpec:
    spec.submodules.input_layernorm = donor.submodules.input_layernorm
    spec.submodules.pre_mlp_layernorm = donor.submodules.pre_mlp_layernorm
    return spec


def build_model(cfg: ModelConfig, tp: int = 1, pp: int = 1, pre_process: bool = True,
                post_process: bool = True, dtype: torch.dtype = torch.float32,
                perf: PerformanceConfig = LOCAL):
    """A megatron-core model for this rank (pre/post_process: first/last pipeline stage)."""
    config = transformer_config(cfg, tp, pp, dtype, perf)
    spec = layer_spec(cfg, perf.transformer_impl)
    if perf.sequence_parallel and perf.transformer_impl == "local":
        spec = _sequence_parallel_block(cfg, config, spec)
    common = dict(
        config=config,
        transformer_layer_spec=spec,
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
        bert = BertModel if perf.transformer_impl == "transformer_engine" else SDPABertModel
        model = bert(num_tokentypes=cfg.num_tokentypes, add_binary_head=cfg.bert_binary_head,
                     **common)
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
