"""The local executor's ranks keep their logs as SLURM's tasks do, and no process floods its
stderr with megatron-core's fused-kernel fallback warnings."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlmega.launch.local import run_ranks_locally

pytestmark = [pytest.mark.slow]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_every_rank_keeps_an_out_and_err_log_and_rank_0_is_echoed(tmp_path, capsys):
    logs = tmp_path / "logs" / "0-pre-L0" / "local-7"
    code = run_ranks_locally(["plan", str(CONFIGS / "tiny-gpt.yaml")], 2, log_dir=logs,
                             job="local-7")
    assert code == 0
    # srun's names: JOB_RANK_log.out / .err (RUN_DIR/submitit/STAGE/JOB/ on SLURM)
    assert sorted(p.name for p in logs.iterdir()) == [
        "local-7_0_log.err", "local-7_0_log.out", "local-7_1_log.err", "local-7_1_log.out"]
    for rank in (0, 1):
        assert "predicted FLOPs saving" in (logs / f"local-7_{rank}_log.out").read_text()
    shown = capsys.readouterr().out
    assert shown.count("predicted FLOPs saving") == 1, "rank 0 only is echoed here"
    # a failing command: its message is in rank 0's .err and shown on this process's stderr
    code = run_ranks_locally(["plan", str(tmp_path / "missing.yaml")], 1, log_dir=logs,
                             job="local-8")
    assert code == 2
    assert "missing.yaml: cannot read recipe" in (logs / "local-8_0_log.err").read_text()
    assert "missing.yaml: cannot read recipe" in capsys.readouterr().err


def test_a_rank_other_than_0_that_fails_first_shows_its_message(tmp_path, capfd):
    """Rank 1 fails while rank 0 is still starting (held back here by a ``sitecustomize``):
    stopping rank 0 cuts its message off, so rank 1's is shown (without a log directory: its
    stderr; with one: the path of its log)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('RANK') == '0':\n    time.sleep(60)\n")
    env = {"PYTHONPATH": str(tmp_path)}
    argv = ["plan", str(tmp_path / "missing.yaml")]
    started = time.monotonic()
    assert run_ranks_locally(argv, 2, env=env) == 2
    assert time.monotonic() - started < 50, "rank 0 was stopped, not waited for"
    err = capfd.readouterr().err
    assert "rank 1 failed first (exit code 2)" in err
    assert "missing.yaml: cannot read recipe" in err

    logs = tmp_path / "logs"
    assert run_ranks_locally(argv, 2, env=env, log_dir=logs, job="local-9") == 2
    assert f"rank 1 failed first (exit code 2); its stderr: {logs / 'local-9_1_log.err'}" in \
        capfd.readouterr().err
    assert "missing.yaml: cannot read recipe" in (logs / "local-9_1_log.err").read_text()


def test_megatron_fallback_warnings_are_silenced_in_a_slurm_task(tmp_path):
    """A SLURM task imports mlmega (unpickling its StageJob) before megatron-core: the modules
    that warn "Apex is not installed" / "Transformer Engine and Apex are not installed" stay
    quiet (without mlmega: 8 warnings); what training's rank 0 prints instead is one line."""
    code = ("import mlmega.launch.slurm, megatron.core.optimizer, "
            "megatron.core.models.gpt.gpt_layer_specs, megatron.core.models.bert.bert_layer_specs\n"
            "from mlmega.models.megatron_warnings import fallback_note; print(fallback_note())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "not installed" not in done.stderr, done.stderr
    assert done.stdout.count("\n") == 1 and "megatron-core without Apex" in done.stdout
