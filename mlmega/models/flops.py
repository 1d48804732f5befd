"""Model FLOPs per token, Megatron-LM's accounting (Narayanan et al. 2021, appendix).

Forward FLOPs per token = 2 x (weights of every linear layer in the transformer layers)
                        + 4 x L x s x h_attn   (QK^T and attention x V, full s x s, causal or not)
                        + 2 x h x V            (the logits)
Training (forward + backward) = 3 x forward. For a GPT with 4h FFN this is Megatron-LM's
72 B s L h^2 (1 + s/(6h) + V/(12 h L)) per batch. Embedding look-ups and norms are not counted.
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


def forward_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    attention_width = cfg.num_attention_heads * cfg.head_dim
    return (2.0 * cfg.num_layers * linear_weights_per_layer(cfg)
            + 4.0 * cfg.num_layers * seq_length * attention_width
            + 2.0 * cfg.hidden_size * cfg.padded_vocab_size(1))


def training_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Model FLOPs to train on one token (forward + backward)."""
    return 3.0 * forward_flops_per_token(cfg, seq_length)
