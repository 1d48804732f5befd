"""Let megatron-core run on machines without CUDA (CPU + gloo). Inert where CUDA exists.

megatron-core 0.16 allocates TP/PP communication buffers with ``torch.cuda.current_device()``,
calls ``torch.cuda.synchronize()`` around collectives, moves the tied-embedding copy with
``Tensor.cuda()`` and builds schedule, optimizer and gradient-buffer tensors with a hard-coded
``device="cuda"``. On a CPU-only machine every one of those would raise; :func:`install` makes them
resolve to the CPU instead. It changes nothing that could have worked: only requests for a CUDA
device, on a machine that has none, are redirected. One function is replaced: megatron's
``clip_grad_by_total_norm_fp32`` asserts that gradients are ``torch.cuda.FloatTensor``; the
replacement scales the same gradients by the same coefficient without that assertion. The
distributed optimizer sorts parameters by ``Tensor.type()`` names ('torch.cuda.FloatTensor', ...)
while it is built; during its constructor a CPU tensor's ``type()`` answers with that CUDA name.

megatron's model-parallel RNG tracker (``tensor_parallel.get_cuda_rng_tracker``: per-TP-rank
dropout streams, recomputation) swaps CUDA generator states; on CPU, dropout draws from the CPU
generator, so the tracker's CUDA generator calls are pointed at it (get/set state, seed), and the
tracker's warning that the CPU state changed inside a fork (which on CPU is the fork's purpose) is
dropped.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
              "randint", "zeros_like", "ones_like", "empty_like", "full_like")
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
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    for name in _FACTORIES:
        setattr(torch, name, _cpu_instead_of_cuda(getattr(torch, name)))
    _replace_grad_clipping()
    _rng_tracker_on_cpu_generator()
    _type_params_as_cuda_in_distributed_optimizer()
    _installed = True
    return True


def _cpu_instead_of_cuda(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and str(device).startswith("cuda"):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapper


def _replace_grad_clipping() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


@contextlib.contextmanager
def _cpu_tensor_types_named_as_cuda():
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _type_params_as_cuda_in_distributed_optimizer() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    init = DistributedOptimizer.__init__

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        with _cpu_tensor_types_named_as_cuda():
            init(self, *args, **kwargs)

    DistributedOptimizer.__init__ = wrapper


def _rng_tracker_on_cpu_generator() -> None:
    from megatron.core.tensor_parallel import random as megatron_random

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    torch.cuda.get_rng_state = torch.cuda.random.get_rng_state = get_rng_state
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = set_rng_state
    logging.getLogger(megatron_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())
