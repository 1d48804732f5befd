"""Model FLOPs per token: Megatron-LM core_v0.16.1's ``num_floating_point_operations`` for a GPT.

Forward FLOPs per token = 2 x (weights of every linear layer in the transformer layers)
                        + 2 x L x s x h_attn x 2 x c   (QK^T and attention x V)
                        + 2 x h x V                    (the logits)
with c = 1/2 for causal attention (GPT: only half of the s x s scores are computed, as Megatron-LM
counts) and c = 1 for BERT's bidirectional attention (Megatron-LM halves it for every model; here
BERT's count is full s x s). Training (forward + backward) = 3 x forward. GQA, SwiGLU and the padded
vocabulary enter as Megatron-LM's formula has them; embedding look-ups, norms, biases and BERT's
LM-head transform, pooler and binary head are not counted (nor are they there).
"""

from __future__ import annotations

from mlmega.config.model import ModelConfig
from mlmega.models.params import WIDTH_SPACES, parameter_table, space_size


def linear_weights_per_layer(cfg: ModelConfig) -> int:
    """Weights of one transformer layer's linear maps (QKV, proj, fc1, fc2)."""
    total = 0
    for spec in parameter_table(cfg):
        if spec.per_layer and len(spec.dims) == 2 and all(d in WIDTH_SPACES for d in spec.dims):
            total += space_size(cfg, spec.dims[0]) * space_size(cfg, spec.dims[1])
    return total


def attended_positions(cfg: ModelConfig, seq_length: int) -> float:
    """Keys a query attends to on average: s/2 under GPT's causal mask, s for BERT."""
    return seq_length / 2 if cfg.arch == "gpt" else float(seq_length)


def forward_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    attention_width = cfg.num_attention_heads * cfg.head_dim
    return (2.0 * cfg.num_layers * linear_weights_per_layer(cfg)
            + 4.0 * cfg.num_layers * attended_positions(cfg, seq_length) * attention_width
            + 2.0 * cfg.hidden_size * cfg.padded_vocab_size(1))


def training_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Model FLOPs to train on one token (forward + backward)."""
    return 3.0 * forward_flops_per_token(cfg, seq_length)
