"""torch's LayerNorm / RMSNorm for megatron-core's local spec under sequence parallelism.

megatron-core's own torch norm (``WrappedTorchNorm``) refuses sequence parallelism, and its fused
ones need apex or TransformerEngine (CUDA). What sequence parallelism asks of a norm is only that
its weights say so: each TP rank then normalises its own slice of the sequence, and
``finalize_model_grads`` all-reduces the weights' gradients over TP (the ``sequence_parallel``
attribute megatron's FusedLayerNorm and TENorm set too).
"""

from __future__ import annotations

import torch


class SequenceParallelNorm:
    """Builds ``torch.nn.LayerNorm`` / ``RMSNorm`` (config.normalization) with its parameters
    marked ``sequence_parallel`` as the config says (megatron-core's norm signature)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
