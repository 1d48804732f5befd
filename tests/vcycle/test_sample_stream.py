"""The V-cycle and its baseline read one sample stream: the V-cycle's stages, one after another,
read exactly the samples the baseline reads, in the same order (Megatron's consumed_train_samples
carried across stages and levels), whatever the data-parallel size."""

from __future__ import annotations

import pytest
import torch
import yaml

from mlmega.config.train import TrainConfig
from mlmega.train.data import Batches, open_datasets
from mlmega.vcycle.plan import plan_vcycle
from mlmega.vcycle.recipe import recipe_from_dict
from mlmega.vcycle.run import create_run, stage_config_path
from tests.conftest import VOCAB


def recipe(arch: str, data_dir):
    return recipe_from_dict(dict(
        name="stream", model=dict(arch=arch, num_layers=2, hidden_size=64,
                                  num_attention_heads=4, vocab_size=VOCAB,
                                  max_sequence_length=32),
        levels=[dict(width=dict(kind="stacked", factor=2))],
        schedule=dict(coalesce_steps=[3], bottom_steps=5, decoalesce_steps=[4], lr=[1e-3, 2e-3]),
        training=dict(seq_length=32, micro_batch_size=2, global_batch_size=4),
        data=dict(dir=str(data_dir), prepare=False)), "<stream>")


def read_run(run_dir, names, dp: int) -> tuple[list[int], list[torch.Tensor]]:
    """Every sample index and input a run's stages read, in order (DP ranks' slices joined)."""
    indices, inputs = [], []
    for name in names:
        cfg = TrainConfig.from_yaml(stage_config_path(run_dir, name))
        train, _ = open_datasets(cfg.model.arch, cfg.data_dir, cfg.seq_length, cfg.seed,
                                 cfg.data_samples, cfg.global_batch_size)
        ranks = [Batches(train, cfg.global_batch_size, cfg.micro_batch_size, dp, r,
                         first_sample=cfg.first_sample) for r in range(dp)]
        for step in range(cfg.steps):
            for batches in ranks:
                indices += batches.sample_indices(step)
                key = "tokens" if cfg.model.arch == "gpt" else "text"
                inputs += [mb[key] for mb in batches.microbatches(step)]
    return indices, inputs


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_vcycle_stages_read_the_baselines_samples(tmp_path, prepared, arch):
    plan = plan_vcycle(recipe(arch, prepared[arch]))
    create_run(plan, tmp_path / "vcycle", prepared[arch], "local")
    create_run(plan, tmp_path / "baseline", prepared[arch], "local", [plan.baseline])
    assert plan.baseline.steps == 12 and plan.data_samples == 48
    stages = [s.name for s in plan.stages]
    for dp in (1, 2):
        v_idx, v_inputs = read_run(tmp_path / "vcycle", stages, dp)
        b_idx, b_inputs = read_run(tmp_path / "baseline", ["baseline"], dp)
        assert v_idx == b_idx == list(range(48))
        assert torch.equal(torch.cat(v_inputs), torch.cat(b_inputs))
    post = yaml.safe_load(stage_config_path(tmp_path / "vcycle", stages[-1]).read_text())
    assert (post["first_sample"], post["data_samples"]) == (32, 48)
