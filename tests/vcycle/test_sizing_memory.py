"""Sizing's memory model counts megatron-core's switches: the distributed optimizer shards the
optimizer states over DP, sequence parallelism divides activations by TP, recomputation drops them.

Hand numbers for GPT-2 small (124.4M parameters; 12 layers, h=768, 12 heads, V=50304), micro batch
8, seq 1024 (sbh = 6.29M): see each test."""

from __future__ import annotations

import pytest

from mlmega.config.performance import PerformanceConfig
from mlmega.vcycle.recipe import load_recipe
from mlmega.vcycle.sizing import memory_per_gpu, stage_param_counts
from tests.vcycle.test_plan import CONFIGS

OFF = PerformanceConfig(distributed_optimizer=False, sequence_parallel=False, recompute="none",
                        overlap_grad_reduce=False)


@pytest.fixture(scope="module")
def gpt2():
    return load_recipe(CONFIGS / "gpt-base.yaml").model


def test_distributed_optimizer_divides_optimizer_states_by_dp(gpt2):
    plain = memory_per_gpu(gpt2, 1, 1, 4, 8, 1024, OFF)
    zero1 = memory_per_gpu(gpt2, 1, 1, 4, 8, 1024, OFF.__class__(**{**OFF.__dict__,
                                                                  "distributed_optimizer": True}))
    params = plain.weights / 2
    assert params == pytest.approx(124.4e6, rel=2e-3)
    assert plain.optimizer == pytest.approx(12 * params)
    assert zero1.optimizer == pytest.approx(3 * params)  # 12 bytes / DP 4
    assert (zero1.weights, zero1.gradients, zero1.activations) == \
        (plain.weights, plain.gradients, plain.activations)


def test_activations_by_recompute_and_sequence_parallel(gpt2):
    sbh, layers = 1024 * 8 * 768, 12
    scores = 5 * 12 * 1024 / 768  # 80: the s x s attention terms per sbh

    def act(tp, **switches):
        perf = PerformanceConfig(**{**OFF.__dict__, **switches})
        return memory_per_gpu(gpt2, tp, 1, 1, 8, 1024, perf).activations

    assert act(1) == pytest.approx(layers * sbh * (34 + scores))
    assert act(2) == pytest.approx(layers * sbh * (10 + 12 + scores / 2))
    assert act(2, sequence_parallel=True) == pytest.approx(layers * sbh * (34 + scores) / 2)
    assert act(2, recompute="selective") == pytest.approx(layers * sbh * 22)
    assert act(2, recompute="selective", sequence_parallel=True) == pytest.approx(
        layers * sbh * 17)
    # full: each layer keeps its bf16 input, plus one layer's activations while it reruns
    assert act(1, recompute="full") == pytest.approx(layers * 2 * sbh + sbh * (34 + scores))


def test_pipeline_depth_keeps_pp_micro_batches_in_flight(gpt2):
    """1F1B: the first stage holds PP micro-batches of its L/PP layers, i.e. L layers' worth."""
    one = memory_per_gpu(gpt2, 1, 1, 1, 8, 1024, OFF)
    two = memory_per_gpu(gpt2, 1, 2, 1, 8, 1024, OFF)
    assert two.activations == pytest.approx(one.activations)
    assert two.weights == pytest.approx(2 * stage_param_counts(gpt2, 2))  # the larger stage
    assert two.weights < 0.7 * one.weights  # 6 of 12 layers plus the 38.6M-row embeddings
