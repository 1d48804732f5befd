"""Let megatron-core run on machines without CUDA (CPU + gloo). Inert where CUDA exists.

megatron-core 0.16 allocates TP/PP communication buffers with ``torch.cuda.current_device()``,
calls ``torch.cuda.synchronize()`` around collectives, moves the tied-embedding copy with
``Tensor.cuda()`` and builds some schedule tensors with a hard-coded ``device="cuda"``. On a CPU-only
machine :func:`install` makes those calls resolve to the CPU. It patches only the ``torch.cuda`` entry points megatron uses and only when CUDA is absent.
"""

from __future__ import annotations

import functools

import torch

_installed = False


def install() -> bool:
    """Install the CPU shims if CUDA is unavailable; returns True when they are active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    _redirect_cuda_device_kwarg()
    _installed = True
    return True


def _redirect_cuda_device_kwarg() -> None:
    """Send ``device="cuda"`` tensor factories in megatron's schedules to the CPU."""
    from megatron.core.pipeline_parallel import schedules

    class _TorchWithCpuDefault:
        """Proxy for the ``torch`` module inside megatron's schedules module."""

        def __getattr__(self, name):
            attr = getattr(torch, name)
            if name in {"zeros", "ones", "empty", "tensor", "full"}:
                return functools.partial(_cpu_factory, attr)
            return attr

    schedules.torch = _TorchWithCpuDefault()


def _cpu_factory(factory, *args, **kwargs):
    if str(kwargs.get("device", "")).startswith("cuda"):
        kwargs["device"] = "cpu"
    return factory(*args, **kwargs)
