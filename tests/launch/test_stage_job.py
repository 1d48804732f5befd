"""What every task of a stage's SLURM job does (StageJob), without a cluster: the distributed
environment it exports, and what it does when training stops early (requeue or fail)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from mlmega.checkpoint.directory import TRACKER
from mlmega.launch import slurm_job
from mlmega.train import signals

DIST = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def job_env(monkeypatch, tmp_path):
    """Task 0 of job 77 on fake nodes n1, n2; signal handlers and the signal record restored."""
    saved = {sig: signal.getsignal(sig) for sig in signals.SIGNALS}
    for key in DIST + ("SLURM_RESTART_COUNT",):  # StageJob exports DIST: restore them afterwards
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    for key, value in dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="77", SLURM_NTASKS="2",
                           SLURM_JOB_NUM_NODES="2", SLURM_NODEID="0", SLURM_PROCID="0",
                           SLURM_LOCALID="0", SLURM_JOB_NODELIST="n[1-2]").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(signals, "last_received", None)
    calls = []
    monkeypatch.setattr(slurm_job.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0))
    yield calls
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def stage_job(tmp_path, **changes) -> slurm_job.StageJob:
    return slurm_job.StageJob(**dict(dict(run_dir=str(tmp_path), stage="0-pre-L0",
                                      config=str(tmp_path / "0-pre-L0.yaml"),
                                      save_dir=str(tmp_path / "0-pre-L0"), steps=4,
                                      requeue_grace_s=0.0), **changes))


def fake_training(monkeypatch, code: int, received=None, seen=None):
    import mlmega.train.loop as loop

    def main(config):
        if seen is not None:
            seen.append((config, {k: os.environ[k] for k in DIST}))
        signals.last_received = received
        return code

    monkeypatch.setattr(loop, "main", main)


def test_exports_rendezvous_and_trains(tmp_path, job_env, monkeypatch):
    seen = []
    fake_training(monkeypatch, 0, seen=seen)
    result = stage_job(tmp_path)()
    assert result["status"] == "completed" and job_env == []
    config, env = seen[0]
    assert config.endswith("0-pre-L0.yaml")
    # n1 does not resolve here: rendez-vous on 127.0.0.1; the port is seeded from the job id
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["RANK"] == "0" and env["WORLD_SIZE"] == "2"
    assert env["MASTER_PORT"] == str(slurm_job.rendezvous_port(os.environ["SLURM_JOB_ID"]))
    # submitit's USR2 handler (checkpoint + requeue + exit) no longer answers the signals
    assert all(signal.getsignal(sig) is signals._record_early for sig in signals.SIGNALS)


def test_rendezvous_port_is_per_job_and_below_the_ephemeral_range():
    """Every task of a job computes the same port; jobs get different ones; none is in Linux's
    default ephemeral range (32768-60999), where the kernel gives other sockets their ports."""
    ports = [slurm_job.rendezvous_port(str(job)) for job in range(1000)]
    assert ports[:10] == [slurm_job.rendezvous_port(str(job)) for job in range(10)]
    assert all(20000 <= port < 32768 for port in ports) and len(set(ports)) > 950


def test_master_port_from_the_environment_is_kept(tmp_path, job_env, monkeypatch):
    seen = []
    fake_training(monkeypatch, 0, seen=seen)
    monkeypatch.setenv("MASTER_PORT", "45678")  # e.g. from cluster.env
    stage_job(tmp_path)()
    assert seen[0][1]["MASTER_PORT"] == "45678"


def test_resolvable_master_is_kept():
    assert slurm_job.rendezvous_address("localhost") == "localhost"
    assert slurm_job.rendezvous_address("n1.invalid") == "127.0.0.1"


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGUSR1])
def test_preemption_warning_requeues_the_job(tmp_path, job_env, monkeypatch, sig):
    fake_training(monkeypatch, 3, received=sig)
    with pytest.raises(slurm_job.StageInterrupted, match="not stopped by its requeue"):
        stage_job(tmp_path)()  # (SLURM stops the task during the grace period)
    assert job_env == [["scontrol", "requeue", "77"]]


def test_only_rank_0_requeues(tmp_path, job_env, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "1")
    fake_training(monkeypatch, 3, received=signal.SIGUSR2)
    with pytest.raises(slurm_job.StageInterrupted):
        stage_job(tmp_path)()
    assert job_env == []


def test_requeues_are_capped(tmp_path, job_env, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    fake_training(monkeypatch, 3, received=signal.SIGUSR2)
    with pytest.raises(slurm_job.StageInterrupted, match="not requeued again"):
        stage_job(tmp_path, max_requeues=3)()
    assert job_env == []


def test_sigterm_fails_the_job_without_requeue(tmp_path, job_env, monkeypatch):
    """scancel / time limit: the job must not succeed (afterok would start the next stage)."""
    fake_training(monkeypatch, 3, received=signal.SIGTERM)
    with pytest.raises(slurm_job.StageInterrupted, match="SIGTERM"):
        stage_job(tmp_path)()
    assert job_env == []


def test_finished_stage_returns_at_once(tmp_path, job_env, monkeypatch):
    (tmp_path / "0-pre-L0").mkdir()
    (tmp_path / "0-pre-L0" / TRACKER).write_text("4")
    seen = []
    fake_training(monkeypatch, 0, seen=seen)
    assert stage_job(tmp_path)()["status"] == "completed"
    assert seen == []


def test_signal_before_training_is_kept_for_the_stop_flag(job_env):
    signals.catch_early()
    signal.raise_signal(signal.SIGUSR2)
    assert signals.last_received == signal.SIGUSR2
    flag = signals.StopFlag()
    assert flag.received == signal.SIGUSR2  # saves after its first step instead of dying
    assert signals.StopFlag().received is None  # handed over once
