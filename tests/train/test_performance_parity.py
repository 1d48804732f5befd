"""megatron-core's performance switches change how a step runs, not what it computes (gloo, CPU).

The same model, data and seed train to the same losses with the distributed optimizer (ZeRO-1),
overlapped grad reduce and param gather (gloo's async collectives), sequence parallelism and
activation recomputation (selective, full) on as with them off: at TP=2, PP=2, DP=2 (8 ranks) for
all but full recomputation, which runs at TP=2 with sequence parallelism (2 ranks;
tests/train/test_parallel_parity.py shows the layouts agree). Tolerance: 1e-4 relative per step
over 4 steps (fp32; only the order of reductions differs: measured equal to 4 decimals). Every run
starts from one checkpoint, resharded at load (the V-cycle's hand-off path). A run with the
distributed optimizer stopped and resumed gives the straight run's losses exactly (its DP-sharded
state is saved as ``distrib_optim.pt``).
"""

from __future__ import annotations

import pytest

from mlmega.checkpoint.formats import save_full_state
from mlmega.checkpoint.layout import ShardLayout
from mlmega.config.model import ModelConfig
from tests.helpers import make_model_state
from tests.train.conftest import (assert_losses_match, losses, model_section, run_stage,
                                  stage_config)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

OFF = dict(distributed_optimizer=False, sequence_parallel=False, recompute="none")


def _init(tmp_path, arch: str) -> dict:
    cfg = ModelConfig.from_dict(model_section(arch))
    save_full_state(make_model_state(cfg, seed=0), ShardLayout(cfg), tmp_path / "init")
    return dict(checkpoint=str(tmp_path / "init"), op="reshard")


def test_switches_keep_the_losses_at_tp2_pp2_dp2(tmp_path, prepared, model_parallel):
    init = _init(tmp_path, "gpt")
    settings = {"off": (2, 8, OFF),
                "zero1_overlap_sp_selective": (2, 8, dict(
                    distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True,
                    sequence_parallel=True, recompute="selective")),
                "sp_full_recompute": (1, 2, dict(OFF, sequence_parallel=True, recompute="full"))}
    runs = {}
    for name, (pp, nproc, perf) in settings.items():
        config = stage_config(tmp_path, name, prepared["gpt"], tp=2, pp=pp, init=init,
                              performance=perf)
        run_stage(config, nproc)
        runs[name] = losses(tmp_path / name)
    assert_losses_match(runs, "off")


def test_distributed_optimizer_resumes_exactly(tmp_path, prepared, model_parallel):
    """4 steps straight vs 2 + resume 2 (TP=1, PP=1, DP=2; the state is DP-sharded), and the
    run's checkpoint records the switch under Megatron-LM's argument name."""
    from mlmega.checkpoint.torch_format import TorchCheckpoint

    init = _init(tmp_path, "bert")
    perf = dict(distributed_optimizer=True)
    straight = stage_config(tmp_path, "straight", prepared["bert"], "bert", init=init,
                            performance=perf)
    run_stage(straight, 2)
    split = stage_config(tmp_path, "split", prepared["bert"], "bert", init=init, performance=perf,
                         exit_interval=2)
    run_stage(split, 2, expect=3)
    assert (tmp_path / "split" / "iter_0000002" / "mp_rank_00" / "distrib_optim.pt").is_file()
    run_stage(split, 2)
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    ckpt = TorchCheckpoint.open(tmp_path / "split")
    assert ckpt.args.use_distributed_optimizer is True
    assert ckpt.args.transformer_impl == "local"


def test_switch_that_needs_a_gpu_is_refused_on_cpu(tmp_path, prepared):
    """TransformerEngine needs CUDA: refused on gloo with a one-line error that names the GPU
    device check covering it (``benchmarks/train_throughput.py --suite``)."""
    config = stage_config(tmp_path, "te", prepared["gpt"],
                          performance=dict(transformer_impl="transformer_engine"))
    proc = run_stage(config, 1, expect=2)
    assert "performance.transformer_impl='transformer_engine' needs a GPU" in proc.stderr
    assert "train_throughput.py --suite" in proc.stderr
