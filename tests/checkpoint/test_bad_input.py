"""Bad checkpoints and conversion requests fail before any work, naming the problem, and leave the
destination untouched (killed and failed writes: test_writes.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from mlmega.checkpoint.convert import run_conversion
from mlmega.checkpoint.convert_plan import plan_conversion
from mlmega.checkpoint.formats import save_full_state
from mlmega.checkpoint.integrity import manifest_path
from mlmega.checkpoint.layout import ShardLayout
from mlmega.checkpoint.directory import TRACKER
from mlmega.checkpoint.torch_format import TorchCheckpoint
from mlmega.config.errors import CheckpointError, ConfigError
from mlmega.config.model import ModelConfig
from mlmega.operators import LevelSchemes
from tests.helpers import make_model_state

CFG = ModelConfig(arch="gpt", num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=100,
                  max_sequence_length=16)
WIDTH = LevelSchemes.from_factors(width_factor=2)


@pytest.fixture
def ckpt(tmp_path, model_parallel) -> Path:
    root = tmp_path / "src"
    save_full_state(make_model_state(CFG, seed=0), ShardLayout(CFG, 2, 2), root, iteration=3)
    return root


def refused(match: str, error: type = CheckpointError, **kwargs):
    dst = kwargs.pop("dst")
    with pytest.raises(error, match=match):
        plan_conversion(kwargs.pop("op", "reshard"), kwargs.pop("src"), dst, **kwargs)
    assert not dst.exists(), "a refused conversion must not create its destination"


def test_missing_shard_directory(ckpt, tmp_path):
    shutil.rmtree(ckpt / "iter_0000003" / "mp_rank_01_001")
    refused(r"missing \['mp_rank_01_001'\]", src=ckpt, dst=tmp_path / "out")


def test_extra_shard_directory(ckpt, tmp_path):
    shutil.copytree(ckpt / "iter_0000003" / "mp_rank_01_001", ckpt / "iter_0000003" / "mp_rank_02_001")
    refused(r"unexpected \['mp_rank_02_001'\]", src=ckpt, dst=tmp_path / "out")


def test_missing_shard_file(ckpt, tmp_path):
    (ckpt / "iter_0000003" / "mp_rank_00_001" / "model_optim_rng.pt").unlink()
    refused(r"mp_rank_00_001.*model_optim_rng.pt is missing", src=ckpt, dst=tmp_path / "out")


def test_truncated_shard_file(ckpt, tmp_path):
    path = ckpt / "iter_0000003" / "mp_rank_01_000" / "model_optim_rng.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refused(r"mp_rank_01_000/model_optim_rng.pt: bytes 0\.\.\d+ are not a zip archive \(.*\); "
            r"the file is damaged or truncated", src=ckpt, dst=tmp_path / "out")


def test_args_disagree_with_shards(ckpt, tmp_path):
    # a TP=2 checkpoint whose directories were renamed as if it were TP=1 x PP=4
    iteration = ckpt / "iter_0000003"
    for t, p in [(0, 0), (1, 0), (0, 1), (1, 1)]:
        os.rename(iteration / f"mp_rank_{t:02d}_{p:03d}", iteration / f"tmp_{t}_{p}")
    for i, (t, p) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        os.rename(iteration / f"tmp_{t}_{p}", iteration / f"mp_rank_00_{i:03d}")
    refused(r"args say TP=2, PP=2", src=ckpt, dst=tmp_path / "out")


def test_tracker_names_missing_iteration(ckpt, tmp_path):
    (ckpt / TRACKER).write_text("9")
    refused(r"names iteration 9 but .*iter_0000009 does not exist", src=ckpt, dst=tmp_path / "out")
    (ckpt / TRACKER).write_text("latest")
    refused(r"expected an iteration number or 'release'", src=ckpt, dst=tmp_path / "out")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    refused("not a Megatron torch checkpoint", src=tmp_path / "empty", dst=tmp_path / "out")


def test_tensor_shapes_disagree_with_args(ckpt, tmp_path):
    path = ckpt / "iter_0000003" / "mp_rank_00_000" / "model_optim_rng.pt"
    content = torch.load(path, weights_only=False)
    content["model"]["decoder.layers.0.mlp.linear_fc1.weight"] = torch.zeros(3, 32)
    torch.save(content, path)
    manifest_path(path).unlink()  # the rewritten file's own CRC32s stand
    refused(r"linear_fc1.weight has shape \(3, 32\), expected \(64, 32\)", src=ckpt,
            dst=tmp_path / "out")


def test_target_layout_must_divide_the_model(ckpt, tmp_path):
    refused(r"num_attention_heads=4 is not divisible by TP=3", ConfigError, src=ckpt,
            dst=tmp_path / "o", target_tp=3)
    refused(r"num_layers=4 is not divisible by PP=3", ConfigError, src=ckpt, dst=tmp_path / "o",
            target_pp=3)
    refused(r"num_attention_heads=2 is not divisible by TP=4", ConfigError, op="coalesce",
            src=ckpt, dst=tmp_path / "o", schemes=WIDTH, target_tp=4)


def test_existing_destination_is_refused_unless_overwrite(ckpt, tmp_path):
    dst = tmp_path / "out"
    run_conversion(plan_conversion("reshard", ckpt, dst, target_pp=1))
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        plan_conversion("reshard", ckpt, dst, target_tp=1)
    assert TorchCheckpoint.open(dst).layout.tp == 2
    run_conversion(plan_conversion("reshard", ckpt, dst, target_tp=1, overwrite=True),
                   overwrite=True)
    assert TorchCheckpoint.open(dst).layout.tp == 1


def test_operator_requests_are_validated(ckpt, tmp_path):
    refused("needs a scheme", ConfigError, op="coalesce", src=ckpt, dst=tmp_path / "o")
    refused("needs --large", ConfigError, op="interpolate", src=ckpt, dst=tmp_path / "o",
            schemes=WIDTH)
    refused(r"--alpha=1.5: expected a number in \[0, 1\]", ConfigError, op="interpolate",
            src=ckpt, dst=tmp_path / "o", schemes=WIDTH, large=ckpt, alpha=1.5)
    # the de-coalesced model of ckpt is twice as wide: ckpt itself is not its large level
    with pytest.raises(CheckpointError) as err:
        plan_conversion("interpolate", ckpt, tmp_path / "o", schemes=WIDTH, large=ckpt, alpha=0.5)
    # the mismatch is named field by field (--large first), not as two whole model dicts
    assert str(err.value).endswith(
        "(--large vs de-coalesced --src): hidden_size=32 vs 64, num_attention_heads=4 vs 8, "
        "num_query_groups=4 vs 8, ffn_hidden_size=128 vs 256"), err.value
    assert "vocab_size" not in str(err.value)


def test_reshard_without_a_target_layout_is_refused(ckpt, tmp_path):
    for same in (dict(), dict(target_tp=2), dict(target_tp=2, target_pp=2),
                 dict(target_layers=[2, 2])):
        refused(r"convert reshard: --src .* is already TP=2, PP=2 \(layers per stage 2,2\) in "
                r"format torch; give another --target-tp, --target-pp, --target-pp-layers or "
                r"--format", ConfigError, src=ckpt, dst=tmp_path / "o", **same)
    # another format with the same layout is a conversion
    plan = plan_conversion("reshard", ckpt, tmp_path / "o", fmt="torch_dist")
    assert (plan.target.tp, plan.target.layers_per_pp_stage) == (2, (2, 2))


def test_uneven_pipeline_targets_are_checked(ckpt, tmp_path):
    refused(r"layers_per_pp_stage=\[1, 2\]: expected 2 positive counts summing to num_layers=4",
            ConfigError, src=ckpt, dst=tmp_path / "o", target_layers=[1, 2])
    refused(r"--target-pp=3 and --target-pp-layers=1,3: expected 2 stages in both",
            ConfigError, src=ckpt, dst=tmp_path / "o", target_pp=3, target_layers=[1, 3])
    big = CFG.replace(num_layers=8)
    with pytest.raises(ConfigError, match=r"layers_per_pp_stage=\[1, 2, 3, 2\]: the stages between "
                                          r"the first and the last must hold equal numbers"):
        ShardLayout(big, 1, 4, (1, 2, 3, 2))  # Megatron's args cannot express it

