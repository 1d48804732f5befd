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

    assert "training gpt" in out, "rank 0's output is shown as it runs"
    for entry in state.stages:  # every rank's log kept as on SLURM: logs/STAGE/JOB/JOB_RANK_log.*
        job = entry.job_id.replace(":", "-")
        assert [p.name for p in (run_dir / "logs" / entry.name).iterdir()] == [job]
        log = run_dir / "logs" / entry.name / job / f"{job}_0_log"
        text = log.with_suffix(".out").read_text()
        assert "training gpt" in text and text.count("megatron-core without Apex") == 1
        assert "not installed" not in log.with_suffix(".err").read_text()
        assert entry.wall_s == pytest.approx(entry.ended - entry.started)

    before = metric_lines(run_dir)
    out = mlmega("resume", run_dir)
    assert metric_lines(run_dir) == before, "a resumed complete run must repeat nothing"
    assert [s.attempts for s in RunState.load(run_dir).stages] == [1, 1, 1]
    status = mlmega("status", run_dir)
    assert status.count("completed") == 3


def start_long_run(tmp_path: Path, data_dir: Path, run_dir: Path):
    """``mlmega run`` in the background with a 2000-step bottom stage (long enough to stop while
    it runs), returned once that stage has saved a checkpoint: (recipe, process)."""
    recipe = tiny_recipe(tmp_path, data_dir)
    data = yaml.safe_load(recipe.read_text())
    data["schedule"]["bottom_steps"] = 2000
    data["training"]["save_interval"] = 2
    recipe.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "mlmega", "run", str(recipe), "--run-dir",
                             str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tracker = run_dir / "stages" / "1-bottom-L1" / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 300
    while not tracker.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    return recipe, proc


def test_cancel_midway_then_resume_completes(tmp_path, prepared):
    run_dir = tmp_path / "run"
    _, proc = start_long_run(tmp_path, prepared["gpt"], run_dir)
    bottom = run_dir / "stages" / "1-bottom-L1"
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
    # the bottom stage's wall time covers both attempts, each with its own logs
    walls = state.stages[1].wall
    assert len(walls) == 2 and state.stages[1].wall_s == sum(walls.values())
    spans = state.stages[1].spans  # each attempt's one run: [[start, end]]
    assert sorted(spans) == sorted(walls) and all(len(runs) == 1 for runs in spans.values())
    (first, second) = sorted(runs[0] for runs in spans.values())
    assert first[1] <= second[0]
    assert all(end - start == walls[job] for job, [[start, end]] in spans.items())
    assert sorted(p.name for p in (run_dir / "logs" / "1-bottom-L1").iterdir()) == \
        sorted(job.replace(":", "-") for job in walls)
    assert metric_lines(run_dir)["0-pre-L0"] == pre_lines
    steps = [json.loads(x)["step"] for x in (bottom / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    # steps after the checkpoint that ran before the cancel are trained again; none before it
    assert steps[-2:] == [saved + 1, saved + 2] and steps[:saved] == list(range(1, saved + 1))


def _proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat from its third field on (state, ppid, ...); [] when there is no such pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _running(pid: int) -> bool:
    stat = _proc_stat(pid)
    return bool(stat) and stat[0] != "Z"


def _children(pid: int) -> list[int]:
    """Running (not zombie) processes whose parent is ``pid``."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [p for p in pids if _running(p) and _proc_stat(p)[1] == str(pid)]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_one_writer_kill9_and_a_copied_run_resumes_as_itself(tmp_path, prepared):
    """A second writer is refused naming the holder; kill -9 of the coordinator takes its trainer
    with it and resume sees the coordinator dead; a copy of the run resumes the copy only."""
    import shutil
    import signal

    run_dir = tmp_path / "run"
    recipe, proc = start_long_run(tmp_path, prepared["gpt"], run_dir)
    bottom = run_dir / "stages" / "1-bottom-L1"

    for argv in (["resume", run_dir], ["run", recipe, "--run-dir", run_dir]):
        second = subprocess.run([sys.executable, "-m", "mlmega", *map(str, argv)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"`mlmega run` (pid {proc.pid} on " in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    trainers = _children(proc.pid)
    assert len(trainers) == 1  # one rank
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in trainers):
        assert time.monotonic() < deadline, "the trainer outlived its coordinator"
        time.sleep(0.1)
    state = RunState.load(run_dir)
    assert state.stages[1].status == "running" and state.stages[1].job_id == f"local:{proc.pid}"
    mlmega("status", run_dir)  # sees the coordinator dead (pid and start time), records it
    assert [s.status for s in RunState.load(run_dir).stages] == ["completed", "failed", "pending"]
    saved = TorchCheckpoint.open(bottom).iteration
    assert 2 <= saved < 2000

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    original = _snapshot(run_dir)
    config = copy / "stages" / "1-bottom-L1.yaml"  # finish the copy quickly
    stage = yaml.safe_load(config.read_text())
    assert not Path(stage["save_dir"]).is_absolute() and stage["init"]["checkpoint"] == "0-pre-L0"
    stage["steps"] = saved + 2
    config.write_text(yaml.safe_dump(stage))
    rdata = yaml.safe_load((copy / "recipe.yaml").read_text())
    rdata["schedule"]["bottom_steps"] = saved + 2
    (copy / "recipe.yaml").write_text(yaml.safe_dump(rdata))
    out = mlmega("resume", copy, "--set", "cluster.time_limit_min=5")
    state = RunState.load(copy)
    assert [s.status for s in state.stages] == ["completed"] * 3
    assert state.stages[1].attempts == 2 and state.stages[0].attempts == 1
    assert f"final checkpoint: {copy / 'stages' / '2-post-L0'}" in out
    copied_bottom = copy / "stages" / "1-bottom-L1"
    assert f"resumed from {copied_bottom / f'iter_{saved:07d}'} at step {saved}" in out, out
    assert f"initialised from {copied_bottom} (interpolate)" in out, out
    assert f"{run_dir}/" not in out
    assert yaml.safe_load((copy / "recipe.yaml").read_text())["cluster"]["time_limit_min"] == 5
    assert TorchCheckpoint.open(copy / "stages" / "1-bottom-L1").iteration == saved + 2
    assert _snapshot(run_dir) == original, "resuming the copy wrote into the original"
    assert not (run_dir / "stages" / "2-post-L0" / "latest_checkpointed_iteration.txt").exists()
