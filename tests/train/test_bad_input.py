"""Bad stage configs fail before training starts, with a message naming the problem."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import file_records, flip_byte
from tests.train.conftest import model_section, stage_config


def fails(config, nproc: int = 1) -> str:
    proc = subprocess.run([sys.executable, "-m", "mlmega", "train", str(config), "--nproc",
                           str(nproc)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not (config.parent / config.stem / "latest_checkpointed_iteration.txt").exists()
    return proc.stderr


def test_missing_data_directory(tmp_path):
    msg = fails(stage_config(tmp_path, "run", tmp_path / "nowhere"))
    assert "nowhere" in msg


def test_vocabulary_smaller_than_the_tokenizer(tmp_path, prepared):
    config = stage_config(tmp_path, "run", prepared["gpt"], model=model_section("gpt", vocab_size=100))
    assert "model.vocab_size=100 is smaller than the tokenizer" in fails(config)


def test_sequence_longer_than_max_positions(tmp_path, prepared):
    config = stage_config(tmp_path, "run", prepared["gpt"], seq_length=64)
    assert "seq_length=64: expected at most the model's max_sequence_length=32" in fails(config)


@pytest.mark.multiprocess
def test_world_size_not_tp_pp_dp(tmp_path, prepared):
    config = stage_config(tmp_path, "run", prepared["gpt"], tp=2, dp=2)
    assert "world size 2 is not TP x PP x DP = 2 x 1 x 2" in fails(config, nproc=2)


def test_unknown_option(tmp_path, prepared):
    config = stage_config(tmp_path, "run", prepared["gpt"], learning_rate=0.1)
    assert "unknown training option(s) ['learning_rate']" in fails(config)


def test_bf16_without_a_gpu(tmp_path, prepared):
    import torch

    if torch.cuda.is_available():
        pytest.skip("bf16 is valid where CUDA exists")
    config = stage_config(tmp_path, "run", prepared["gpt"], precision="bf16")
    assert "precision='bf16' needs a GPU" in fails(config)


def test_resuming_another_model_names_what_differs(tmp_path, model_parallel):
    from mlmega.checkpoint.formats import save_full_state
    from mlmega.checkpoint.layout import ShardLayout
    from mlmega.checkpoint.torch_format import TorchCheckpoint
    from mlmega.config.errors import CheckpointError
    from mlmega.config.model import ModelConfig
    from mlmega.train.checkpointing import check_resumable
    from tests.helpers import make_model_state

    cfg = ModelConfig(arch="gpt", num_layers=2, hidden_size=32, num_attention_heads=4,
                      vocab_size=100, max_sequence_length=16)
    save_full_state(make_model_state(cfg, seed=0), ShardLayout(cfg), tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as err:
        check_resumable(TorchCheckpoint.open(tmp_path / "ckpt"),
                        ShardLayout(cfg.replace(num_layers=4), 1, 2))
    assert str(err.value).endswith("(checkpoint vs stage): num_layers=2 vs 4, TP=1 vs 1, "
                                   "PP=1 vs 2 (use a fresh save_dir, or convert it)"), err.value


def test_a_bad_model_is_named_once(tmp_path, prepared):
    from mlmega.config.errors import ConfigError
    from mlmega.config.train import TrainConfig

    config = stage_config(tmp_path, "run", prepared["gpt"], model=model_section("gpt", num_layers=0))
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(config)
    assert str(err.value) == f"{config}: model.num_layers=0: expected a positive integer"

def test_data_stream_too_short(tmp_path, prepared):
    config = stage_config(tmp_path, "run", prepared["gpt"], first_sample=16, data_samples=40)
    assert "data_samples=40: expected an integer of at least first_sample + steps x " \
           "global_batch_size = 48" in fails(config)


@pytest.mark.slow
def test_resume_refuses_a_changed_sample_stream(tmp_path, prepared):
    """A checkpoint that consumed samples [0, 16) cannot resume as a stage starting at 8."""
    from tests.train.conftest import run_stage

    run_stage(stage_config(tmp_path, "run", prepared["gpt"], steps=2))
    config = stage_config(tmp_path, "run", prepared["gpt"], steps=4, first_sample=8)
    proc = subprocess.run([sys.executable, "-m", "mlmega", "train", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "consumed_train_samples=16 at step 2, but" in proc.stderr
    assert "reads sample 24 next (first_sample=8, global_batch_size=8)" in proc.stderr


@pytest.mark.slow
def test_resume_refuses_a_damaged_checkpoint(tmp_path, prepared):
    """A flipped byte in a tensor record of the shard to resume from: a one-line error naming the
    record (its zip CRC32), not a run that silently goes on from damaged weights."""
    from tests.train.conftest import run_stage

    run_stage(stage_config(tmp_path, "run", prepared["gpt"], steps=2))
    path = tmp_path / "run" / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt"
    record = max(file_records(path).values(), key=lambda r: r.length)
    flip_byte(path, record.offset + record.length // 2)
    config = stage_config(tmp_path, "run", prepared["gpt"], steps=4)
    proc = subprocess.run([sys.executable, "-m", "mlmega", "train", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{path}: the {record.length}-byte record at byte {record.offset} fails its crc32 " \
           f"check" in proc.stderr
