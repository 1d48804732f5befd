"""lazy_compile: megatron-core imports without inductor; a deferred function compiles at its first
call, with its options, and computes what the function computes; modules compile at once."""

from __future__ import annotations

import subprocess
import sys

import torch

from mlmega.models import lazy_compile

IMPORT_MEGATRON = """
import sys
from mlmega.models import lazy_compile
lazy_compile.install()
import megatron.core.models.gpt.gpt_model, megatron.core.fusions.fused_bias_gelu
print("torch._inductor.compile_fx" in sys.modules)
"""


def test_megatron_imports_without_building_its_compiled_kernels():
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", IMPORT_MEGATRON],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False"], "inductor's compile_fx was imported"


def test_a_function_compiles_at_its_first_call_with_its_options(monkeypatch):
    calls = []
    torch_compile = lazy_compile._eager_compile or torch.compile  # torch's own

    def eager_compile(model, **options):
        calls.append(options)
        return torch_compile(model, **options)

    monkeypatch.setattr(lazy_compile, "_eager_compile", eager_compile)

    @lazy_compile._compile_at_first_call(backend="eager", dynamic=False)
    def gelu_times(x, y):
        return torch.nn.functional.gelu(x) * y

    assert calls == [] and gelu_times.__name__ == "gelu_times"
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    expected = torch.nn.functional.gelu(x) * y
    assert torch.equal(gelu_times(x, y), expected)
    assert torch.equal(gelu_times(x, y), expected)
    assert calls == [dict(backend="eager", dynamic=False)], "compiled once, at the first call"


def test_a_module_compiles_at_once(monkeypatch):
    calls = []
    monkeypatch.setattr(lazy_compile, "_eager_compile",
                        lambda model, **options: calls.append(options) or model)
    layer = torch.nn.Linear(4, 4)
    assert lazy_compile._compile_at_first_call(layer, backend="eager") is layer
    assert calls == [dict(backend="eager")]
