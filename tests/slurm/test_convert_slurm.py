"""`mlmega convert --executor slurm`: one job whose tasks write their ranks' files; the submitting
process publishes only after every task succeeded."""

import subprocess
import sys

import pytest
import torch

from mlmega.checkpoint.convert import run_conversion
from mlmega.checkpoint.convert_plan import plan_conversion
from mlmega.checkpoint.formats import load_full_state, save_full_state
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
