"""megatron-core's warnings that are noise for mlmega: silenced in every process, the one about its
optional fused kernels (Apex, TransformerEngine) said once instead.

Without those kernels megatron-core falls back to torch (norms, AdamW, multi-tensor ops, grad
clipping) and says so with a warning from each of several modules as they are imported, in every
process: on SLURM, ten warnings in every rank's ``.err``. Importing :mod:`mlmega` runs
:func:`silence`; training's rank 0 prints :func:`fallback_note` once.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Optional

_NOISE = ("Transformer Engine and Apex are not installed", "Apex is not installed",
          "full scope is deprecated",  # TransformerConfig's own default cuda_graph_scope
          # per TP rank; GPU jobs with TP > 1 set it (launch.slurm), elsewhere it does not apply
          "When using async grad allreduce it is recommended to set the environment variable "
          "CUDA_DEVICE_MAX_CONNECTIONS",
          "When using sequence parallelism it is recommended to set the environment variable "
          "CUDA_DEVICE_MAX_CONNECTIONS",
          # torch 2.13 deprecates the collectives megatron-core 0.16 calls (sequence parallelism)
          r"`torch\.distributed\.\w+` is deprecated\. Please use `torch\.distributed\.\w+_single`")
_KERNELS = (("Apex", "apex"), ("TransformerEngine", "transformer_engine"))


def silence() -> None:
    """Ignore megatron-core's fallback (and default-config) warnings in this process."""
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)


def fallback_note() -> Optional[str]:
    """One line naming the fused-kernel packages megatron-core runs without (None: it has both)."""
    missing = [name for name, module in _KERNELS if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return (f"megatron-core without {' and '.join(missing)}: its torch fallbacks run (norms, "
            f"optimizer, multi-tensor ops)")
