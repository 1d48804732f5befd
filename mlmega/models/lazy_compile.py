"""``torch.compile`` that does its work at a function's first call, not when it decorates it.

megatron-core decorates its fused kernels (bias-GeLU, bias-SwiGLU, ...) with ``torch.compile``
(``megatron.core.jit.jit_fuser``) as it is imported. Building those wrappers imports inductor:
in every process that imports megatron-core, even where no fused kernel is ever called (importing
mlmega's training loop: 9.3 s of CPU, 5.7 s without them, on a 2-core Xeon). :func:`install`, run
at a rank's entry before megatron-core is imported, makes ``torch.compile(fn, **options)`` return a
function that compiles ``fn`` with the same options when it is first called. What each call
computes is unchanged; a module (``torch.compile(module)``) is compiled at once, as before.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

_eager_compile: Optional[Callable] = None  # torch's own torch.compile, once installed


def install() -> None:
    """Defer ``torch.compile`` of plain functions to their first call, in this process."""
    global _eager_compile
    if _eager_compile is None:
        _eager_compile = torch.compile
        torch.compile = _compile_at_first_call


def _compile_at_first_call(model=None, **options):
    if model is None:  # used as @torch.compile(...)
        return lambda fn: _compile_at_first_call(fn, **options)
    if isinstance(model, torch.nn.Module):
        return _eager_compile(model, **options)
    compiled = None

    @functools.wraps(model)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = _eager_compile(model, **options)
        return compiled(*args, **kwargs)

    return call
