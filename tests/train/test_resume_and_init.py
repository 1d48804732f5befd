"""Exact resume after an interruption (exit_interval, and a real SIGTERM), and starting a level from
the previous level's checkpoint transformed at load time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mlmega.checkpoint.formats import load_full_state, save_full_state
from mlmega.checkpoint.layout import ShardLayout
from mlmega.checkpoint.torch_format import TorchCheckpoint
from mlmega.config.model import ModelConfig
from mlmega.launch.local import forwarding_signals, run_ranks_locally
from mlmega.models.build import build_model
from mlmega.models.state import load_full_state_dict
from mlmega.operators import LevelSchemes, coalesce, decoalesce, interpolate
from mlmega.config.train import TrainConfig
from mlmega.train.data import Batches, open_datasets
from tests.helpers import make_model_state
from tests.train.conftest import losses, model_section, run_stage, stage_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

pytestmark = [pytest.mark.slow]


@pytest.mark.multiprocess
def test_interrupted_run_resumes_to_the_same_losses(tmp_path, prepared):
    """TP=2: stop after step 3 (saved), resume, finish; every loss equals an uninterrupted run's
    exactly (fp32 CPU, same data order, optimizer/scheduler/RNG restored)."""
    full = stage_config(tmp_path, "full", prepared["gpt"], steps=6, tp=2)
    run_stage(full, nproc=2)
    parts = stage_config(tmp_path, "parts", prepared["gpt"], steps=6, tp=2, exit_interval=3)
    run_stage(parts, nproc=2, expect=3)
    assert TorchCheckpoint.open(tmp_path / "parts").iteration == 3
    assert sorted(losses(tmp_path / "parts")) == [1, 2, 3]
    run_stage(parts, nproc=2)  # resumes at step 4 (exit_interval only fires before the end)
    assert losses(tmp_path / "parts") == losses(tmp_path / "full")
    a, _ = load_full_state(tmp_path / "full")
    b, _ = load_full_state(tmp_path / "parts")
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights must be identical"


def test_sigterm_saves_then_resume_completes(tmp_path, prepared):
    config = stage_config(tmp_path, "run", prepared["gpt"], steps=400, log_interval=1)
    proc = subprocess.Popen([sys.executable, "-m", "mlmega", "train", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until training runs, then "preempt" it
        if line.startswith("step      2/"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, out
    saved = TorchCheckpoint.open(tmp_path / "run").iteration
    assert 2 <= saved < 400 and "exiting for requeue" in out
    # the resumed run continues from the saved step (shortened to finish quickly)
    short = stage_config(tmp_path, "run", prepared["gpt"], steps=400, exit_interval=saved + 2)
    run_stage(short, expect=3)
    steps = sorted(losses(tmp_path / "run"))
    assert steps == list(range(1, saved + 3)), "no step repeated or skipped"


def test_sigterm_reaches_the_ranks_of_runs_started_in_threads(tmp_path, prepared):
    """Two runs' ranks started from two threads (the savings protocol's --jobs): a SIGTERM to
    this process, handled in the main thread, reaches both; each saves and exits for requeue.
    A run about to start when the signal came does not start; once out of forwarding_signals,
    runs start again."""
    configs = [stage_config(tmp_path, f"run{i}", prepared["gpt"], steps=400, log_interval=1)
               for i in range(2)]
    logs = [tmp_path / f"logs{i}" for i in range(2)]
    with forwarding_signals(), ThreadPoolExecutor(2) as pool:
        codes = [pool.submit(run_ranks_locally, ["train", str(config)], 1, log_dir=log, job="j")
                 for config, log in zip(configs, logs)]
        deadline = time.monotonic() + 300
        while not all("step      2/" in read_or_empty(log / "j_0_log.out") for log in logs):
            assert time.monotonic() < deadline and not any(c.done() for c in codes)
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert [c.result(timeout=120) for c in codes] == [3, 3]
        late = pool.submit(run_ranks_locally, ["train", str(configs[0])], 1,
                           log_dir=tmp_path / "late", job="j")
        assert late.result(timeout=60) == 3 and not (tmp_path / "late").exists()
    for i, log in enumerate(logs):
        assert "exiting for requeue" in (log / "j_0_log.out").read_text()
        assert 2 <= TorchCheckpoint.open(tmp_path / f"run{i}").iteration < 400
    assert run_ranks_locally(["plan", str(CONFIGS / "tiny-gpt.yaml")], 1) == 0


def read_or_empty(path) -> str:
    return path.read_text() if path.exists() else ""


def _first_batch_loss(cfg: TrainConfig, state) -> float:
    """The loss of ``state`` on the first training batch, computed directly (TP=1, one process)."""
    train_set, _ = open_datasets(cfg.model.arch, cfg.data_dir, cfg.seq_length, cfg.seed,
                                 cfg.steps * cfg.global_batch_size, cfg.global_batch_size)
    model = build_model(cfg.model)
    load_full_state_dict(model, state)
    model.eval()
    total = 0.0
    batches = Batches(train_set, cfg.global_batch_size, cfg.micro_batch_size, 1, 0)
    with torch.no_grad():
        micro = batches.microbatches(0)
        for batch in micro:
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            mask = batch["loss_mask"]
            total += ((per_token * mask).sum() / mask.sum()).item()
    return total / len(micro)


@pytest.mark.multiprocess
def test_start_from_previous_level_gives_the_converted_models_loss(tmp_path, prepared,
                                                                   model_parallel):
    large = ModelConfig.from_dict(model_section("gpt", tie_embeddings=False))
    schemes = LevelSchemes.from_factors(width_factor=2, depth_factor=2)
    large_state = make_model_state(large, seed=1)
    save_full_state(large_state, ShardLayout(large, 2, 1), tmp_path / "large")
    small_state, small = coalesce(large_state, large, schemes)
    schemes_dict = {"width": {"kind": "stacked", "factor": 2},
                    "depth": {"kind": "adjacent", "factor": 2}}

    # coalesce at load time: level 2 starts from the large checkpoint
    down = stage_config(tmp_path, "small", prepared["gpt"], model=small.to_dict(), pp=2,
                        init=dict(checkpoint=str(tmp_path / "large"), op="coalesce",
                                  schemes=schemes_dict))
    run_stage(down, nproc=2)
    expected = _first_batch_loss(TrainConfig.from_yaml(down), small_state)
    assert losses(tmp_path / "small")[1] == pytest.approx(expected, rel=1e-5)

    # de-coalesce + interpolate at load time: back to the large level from the trained small one
    up = stage_config(tmp_path, "back", prepared["gpt"], model=large.to_dict(), tp=2,
                      init=dict(checkpoint=str(tmp_path / "small"), op="interpolate",
                                schemes=schemes_dict, large=str(tmp_path / "large"), alpha=0.25))
    run_stage(up, nproc=2)
    trained_small, _ = load_full_state(tmp_path / "small")
    deco, _ = decoalesce(trained_small, small, schemes)
    start = interpolate(large_state, deco, large, 0.25)
    expected = _first_batch_loss(TrainConfig.from_yaml(up), start)
    assert losses(tmp_path / "back")[1] == pytest.approx(expected, rel=1e-5)


def test_training_starts_from_the_loaded_weights(tmp_path, prepared, model_parallel):
    """A stage initialised from a checkpoint trains from those weights, not from its own random
    init: with a vanishing learning rate, the weights it saves after two steps are the loaded
    ones (to the training dtype). On a GPU (bf16 by default) this checks that the optimizer's fp32
    main copies are taken after loading: built before, its first step wrote the random init back."""
    cfg = ModelConfig.from_dict(model_section("gpt"))
    state = make_model_state(cfg, seed=3)
    save_full_state(state, ShardLayout(cfg), tmp_path / "init")
    config = stage_config(tmp_path, "run", prepared["gpt"], steps=2,
                          optimizer=dict(lr=1e-12, warmup_steps=0, weight_decay=0.0),
                          init=dict(checkpoint=str(tmp_path / "init"), op="reshard"))
    run_stage(config)
    saved, _ = load_full_state(tmp_path / "run")
    for name, tensor in state.items():
        torch.testing.assert_close(saved[name], tensor.to(saved[name].dtype), rtol=1e-6,
                                   atol=1e-9, msg=lambda m: f"{name}: {m}")
