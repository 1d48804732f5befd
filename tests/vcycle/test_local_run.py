"""A whole 2-level tiny GPT V-cycle on the local executor: run, status, cancel midway, resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mlmega.checkpoint.torch_format import TorchCheckpoint
from mlmega.vcycle.run import RunState
from tests.conftest import VOCAB

pytestmark = [pytest.mark.slow]


def tiny_recipe(tmp_path: Path, data_dir: Path, **schedule) -> Path:
    recipe = dict(
        name="tiny-test",
        model=dict(arch="gpt", num_layers=4, hidden_size=64, num_attention_heads=4,
                   vocab_size=VOCAB, max_sequence_length=32),
        levels=[dict(width=dict(kind="stacked", factor=2), depth=dict(kind="adjacent", factor=2))],
        schedule=dict(coalesce_steps=[4], bottom_steps=4, decoalesce_steps=[4], lr=[2e-3, 4e-3],
                      alpha=0.5, **schedule),
        training=dict(seq_length=32, micro_batch_size=2, global_batch_size=8, eval_interval=2,
                      eval_iters=1, log_interval=1),
        data=dict(dir=str(data_dir), prepare=False),
        cluster=dict(executor="local"),
        sizing=dict(tp=1),
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def mlmega(*args, expect=0, timeout=600) -> str:
    proc = subprocess.run([sys.executable, "-m", "mlmega", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def metric_lines(run_dir: Path) -> dict[str, int]:
    return {d.name: len((d / "metrics.jsonl").read_text().splitlines())
            for d in sorted((run_dir / "stages").iterdir()) if d.is_dir()}


def test_vcycle_runs_end_to_end_and_resume_repeats_nothing(tmp_path, prepared):
    run_dir = tmp_path / "run"
    out = mlmega("run", tiny_recipe(tmp_path, prepared["gpt"]), "--run-dir", run_dir)
    final = run_dir / "stages" / "2-post-L0"
    assert f"final checkpoint: {final}" in out and f"loss plot: {run_dir / 'loss.png'}" in out
    state = RunState.load(run_dir)
    assert [s.status for s in state.stages] == ["completed"] * 3
    ckpt = TorchCheckpoint.open(final)
    ckpt.validate_tensors()
    assert ckpt.iteration == 4 and ckpt.layout.cfg.hidden_size == 64
    # one sample stream: each stage starts where the previous one stopped (4 steps x 8 samples)
    assert [s.first_sample for s in state.stages] == [0, 32, 64]
    assert ckpt.args.consumed_train_samples == 96
    assert (run_dir / "loss.png").stat().st_size > 10_000
    # the post stage's validation curve continues the V-cycle's cumulative FLOPs
    records = [json.loads(x) for x in (final / "metrics.jsonl").read_text().splitlines()]
    first_flops = min(r["flops"] for r in records if "val_loss" in r)
    bottom = [json.loads(x) for x in
              (run_dir / "stages" / "1-bottom-L1" / "metrics.jsonl").read_text().splitlines()]
    assert first_flops == pytest.approx(max(r["flops"] for r in bottom))

    before = metric_lines(run_dir)
    out = mlmega("resume", run_dir)
    assert metric_lines(run_dir) == before, "a resumed complete run must repeat nothing"
    assert [s.attempts for s in RunState.load(run_dir).stages] == [1, 1, 1]
    status = mlmega("status", run_dir)
    assert status.count("completed") == 3


def test_cancel_midway_then_resume_completes(tmp_path, prepared):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path, prepared["gpt"])
    data = yaml.safe_load(recipe.read_text())
    data["schedule"]["bottom_steps"] = 2000  # long enough to cancel while it runs
    data["training"]["save_interval"] = 2
    recipe.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "mlmega", "run", str(recipe), "--run-dir",
                             str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bottom = run_dir / "stages" / "1-bottom-L1"
    deadline = time.monotonic() + 300
    while not (bottom / "latest_checkpointed_iteration.txt").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    mlmega("cancel", run_dir)
    assert proc.wait(timeout=120) == 1, "the run stops with its stage cancelled"
    state = RunState.load(run_dir)
    assert [s.status for s in state.stages] == ["completed", "cancelled", "cancelled"]
    saved = TorchCheckpoint.open(bottom).iteration
    assert 2 <= saved < 2000

    # finish quickly: shorten the bottom stage in its stage config, then resume
    config = run_dir / "stages" / "1-bottom-L1.yaml"
    stage = yaml.safe_load(config.read_text())
    stage["steps"] = saved + 2
    config.write_text(yaml.safe_dump(stage))
    recipe_copy = run_dir / "recipe.yaml"
    rdata = yaml.safe_load(recipe_copy.read_text())
    rdata["schedule"]["bottom_steps"] = saved + 2
    recipe_copy.write_text(yaml.safe_dump(rdata))
    pre_lines = metric_lines(run_dir)["0-pre-L0"]
    mlmega("resume", run_dir)
    state = RunState.load(run_dir)
    assert [s.status for s in state.stages] == ["completed"] * 3
    assert [s.attempts for s in state.stages] == [1, 2, 1], "no completed stage repeated"
    assert metric_lines(run_dir)["0-pre-L0"] == pre_lines
    steps = [json.loads(x)["step"] for x in (bottom / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    # steps after the checkpoint that ran before the cancel are trained again; none before it
    assert steps[-2:] == [saved + 1, saved + 2] and steps[:saved] == list(range(1, saved + 1))
