"""Loss parity: the same model, data and seed train to the same losses at TP=2, PP=2 and DP=2 as at
TP=1 (gloo, multi-process). All runs start from one TP=1 checkpoint, resharded per rank at load.

Tolerance: 1e-4 relative per step over 4 steps (fp32 on CPU; reductions are ordered differently
across layouts, measured differences are ~1e-6)."""

from __future__ import annotations

import pytest

from mlmega.checkpoint.formats import save_full_state
from mlmega.checkpoint.layout import ShardLayout
from mlmega.config.model import ModelConfig
from tests.helpers import make_model_state
from tests.train.conftest import (assert_losses_match, losses, model_section, run_stage,
                                  stage_config)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_losses_match_across_layouts(tmp_path, prepared, arch, model_parallel):
    cfg = ModelConfig.from_dict(model_section(arch))
    save_full_state(make_model_state(cfg, seed=0), ShardLayout(cfg), tmp_path / "init")
    init = dict(checkpoint=str(tmp_path / "init"), op="reshard")
    runs = {}
    for name, tp, pp, nproc in [("tp1", 1, 1, 1), ("tp2", 2, 1, 2), ("pp2", 1, 2, 2),
                                ("dp2", 1, 1, 2)]:
        config = stage_config(tmp_path, name, prepared[arch], arch, tp=tp, pp=pp, init=init)
        run_stage(config, nproc)
        runs[name] = losses(tmp_path / name)
    assert_losses_match(runs, "tp1")
