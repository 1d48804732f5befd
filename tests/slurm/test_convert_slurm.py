"""`mlmega convert --executor slurm`: one job whose tasks write their ranks' files; the submitting
process publishes only after every task succeeded, and a job whose submitter died cancels itself."""

import subprocess
import sys

import pytest
import torch

from mlmega.checkpoint.convert import load_full_state, plan_conversion, run_conversion, \
    save_full_state
from mlmega.checkpoint.layout import ShardLayout
from mlmega.config.model import ModelConfig
from mlmega.launch.conversion_job import SlurmConversion
from tests.helpers import make_model_state

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("model_parallel")]

CFG = ModelConfig(arch="gpt", num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=200,
                  max_sequence_length=16)


def test_two_slurm_tasks_write_the_same_checkpoint_as_local_workers(tmp_path):
    state = make_model_state(CFG, seed=4)
    save_full_state(state, ShardLayout(CFG, 1, 1), tmp_path / "src", iteration=7)
    plan = plan_conversion("reshard", tmp_path / "src", tmp_path / "slurm", target_tp=2,
                           target_pp=2)
    lines: list[str] = []
    summary = run_conversion(plan, workers=2, log=lines.append,
                             runner=SlurmConversion(tmp_path / "logs", ntasks=2,
                                                    partition="debug", time_limit_min=5))
    assert summary["ranks"] == 4 and any("SLURM job" in line for line in lines)
    # each of the 2 tasks converted one stage (2 TP ranks): both tasks' logs exist
    logs = sorted(p.name for p in (tmp_path / "logs").glob("*/*_log.out"))
    assert len(logs) == 2 and logs[0].endswith("_0_log.out") and logs[1].endswith("_1_log.out")
    run_conversion(plan_conversion("reshard", tmp_path / "src", tmp_path / "local", target_tp=2,
                                   target_pp=2), log=lambda *a: None)
    got, layout = load_full_state(tmp_path / "slurm")
    local, _ = load_full_state(tmp_path / "local")
    assert (layout.tp, layout.pp) == (2, 2)
    assert all(torch.equal(got[k], state[k]) and torch.equal(got[k], local[k]) for k in state)


def test_a_failed_slurm_job_publishes_nothing(tmp_path):
    save_full_state(make_model_state(CFG, seed=4), ShardLayout(CFG, 1, 1), tmp_path / "src")
    plan = plan_conversion("reshard", tmp_path / "src", tmp_path / "out", target_tp=2)
    (tmp_path / "src").rename(tmp_path / "gone")  # the job's tasks cannot read the source
    with pytest.raises(RuntimeError, match="SLURM job .* failed"):
        run_conversion(plan, workers=2, log=lambda *a: None,
                       runner=SlurmConversion(tmp_path / "logs", ntasks=2, partition="debug",
                                              time_limit_min=5))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging


def test_partition_with_a_line_break_is_refused_before_submitting(tmp_path):
    save_full_state(make_model_state(CFG, seed=4), ShardLayout(CFG, 1, 1), tmp_path / "src")
    proc = subprocess.run([sys.executable, "-m", "mlmega", "convert", "reshard", "--src",
                           str(tmp_path / "src"), "--dst", str(tmp_path / "out"), "--executor",
                           "slurm", "--partition", "debug\n#SBATCH --wrap=touch /tmp/x"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "--partition" in proc.stderr and "line break" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.slurm").exists()


_COORDINATOR = """
import sys
from mlmega.checkpoint.convert import plan_conversion, run_conversion
from mlmega.launch.conversion_job import SlurmConversion
from mlmega.operators import LevelSchemes
src, dst, logs = sys.argv[1:4]
plan = plan_conversion("decoalesce", src, dst, schemes=LevelSchemes.from_factors(2, 2))
run_conversion(plan, workers=2, log=lambda line: print(line, flush=True),
               runner=SlurmConversion(logs, ntasks=2, partition="debug", time_limit_min=5,
                                      poll_s=0.2, orphan_after_s=1.0))
"""


def test_a_job_whose_coordinator_dies_cancels_itself_and_the_rerun_cleans_up(tmp_path):
    """kill -9 of the submitting process: its tasks notice the heartbeat stop and scancel the
    job (the coordinator alone publishes); the next run removes the staging it left."""
    import os
    import signal
    import time

    big = ModelConfig(arch="gpt", num_layers=8, hidden_size=256, num_attention_heads=8,
                      vocab_size=1000, max_sequence_length=64)
    save_full_state(make_model_state(big, seed=0), ShardLayout(big, 2, 1), tmp_path / "src")
    logs = tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, "-c", _COORDINATOR, str(tmp_path / "src"),
                             str(tmp_path / "dst"), str(logs)], stdout=subprocess.PIPE,
                            text=True)
    job_id = None
    for line in proc.stdout:
        if "SLURM job" in line:
            job_id = line.split("SLURM job ")[1].split()[0]
            break
    assert job_id is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
        if job_id not in queue.stdout:
            break
        time.sleep(0.5)
    assert job_id not in queue.stdout, "the orphaned job must end"
    task_logs = "".join(p.read_text() for p in (logs / job_id).glob("*_log.err"))
    assert f"cancelling job {job_id}" in task_logs
    assert not (tmp_path / "dst").exists()
    [staging] = tmp_path.glob(".dst.tmp-*")
    rerun = subprocess.run([sys.executable, "-m", "mlmega", "convert", "reshard", "--src",
                            str(tmp_path / "src"), "--dst", str(tmp_path / "dst"),
                            "--target-tp", "1"],
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{staging}: removed (left by process {proc.pid}" in rerun.stderr
    assert not list(tmp_path.glob(".dst.*"))
