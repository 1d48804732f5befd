"""How the performance switches resolve per run, and what is refused (one-line errors)."""

from __future__ import annotations

import pytest

from mlmega.config.errors import ConfigError
from mlmega.config.performance import PerformanceConfig
from mlmega.config.train import TrainConfig
from tests.train.conftest import model_section


def test_auto_resolves_from_the_layout_and_machine():
    cpu = PerformanceConfig().resolved("gpt", tp=2, dp=2, cuda=False)
    assert (cpu.transformer_impl, cpu.distributed_optimizer, cpu.overlap_grad_reduce,
            cpu.overlap_param_gather, cpu.sequence_parallel, cpu.recompute,
            cpu.fused_kernels) == ("local", True, False, False, True, "none", False)
    gpu = PerformanceConfig().resolved("gpt", tp=1, dp=4, cuda=True, kernels=True)
    assert (gpu.transformer_impl, gpu.distributed_optimizer, gpu.overlap_grad_reduce,
            gpu.overlap_param_gather, gpu.sequence_parallel, gpu.fused_kernels) == \
        ("transformer_engine", True, True, True, False, True)
    # BERT's LM head norm takes sequence parallelism only from TE/apex
    assert not PerformanceConfig().resolved("bert", 2, 1, cuda=True, kernels=False) \
        .sequence_parallel
    assert not PerformanceConfig().resolved("gpt", 1, 1, cuda=False).distributed_optimizer


@pytest.mark.parametrize("switches, message", [
    (dict(transformer_impl="transformer_engine"), "needs a GPU with the transformer_engine"),
    (dict(overlap_param_gather=True, distributed_optimizer=False), "needs distributed_optimizer"),
    (dict(fused_kernels=True), "needs a GPU with TransformerEngine or apex"),
])
def test_what_cannot_run_on_cpu_is_refused(switches, message):
    with pytest.raises(ConfigError, match=message):
        PerformanceConfig(**switches).resolved("gpt", 1, 2, cuda=False)


def test_bad_values_name_key_value_and_choices():
    with pytest.raises(ConfigError, match=r"performance.recompute='some': expected one of"):
        PerformanceConfig(recompute="some")
    with pytest.raises(ConfigError, match=r"performance.sequence_parallel='yes': expected true"):
        PerformanceConfig(sequence_parallel="yes")
    with pytest.raises(ConfigError, match=r"stage.yaml: performance: unknown key\(s\) \['zero'\]"):
        TrainConfig.from_dict(dict(model=model_section("gpt"), data_dir="d", save_dir="s",
                                   steps=2, seq_length=8, micro_batch_size=1, global_batch_size=1,
                                   performance=dict(zero=1)), "stage.yaml")
