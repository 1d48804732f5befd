"""What every task of a stage's SLURM job runs (:class:`StageJob`): rendezvous, training, requeue.

Every task of a job runs ``cluster.python`` (default: the interpreter running mlmega) on
:mod:`mlmega.launch.job_main`, then submitit's job, :class:`StageJob`: it exports RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_ADDR/MASTER_PORT (submitit's ``TorchDistributedEnvironment``: the first node of
the allocation; a port seeded from the job id below the ephemeral port range,
:func:`rendezvous_port`, unless ``cluster.env`` sets MASTER_PORT) and runs the stage's
``mlmega train`` in-process. No ``--wckey`` unless ``cluster.wckey`` sets one.

Signals and requeue (end to end):
  * sbatch: ``--signal=USR2@90`` (submitit's preemption warning, 90 s before the time limit; also
    what ``scancel --signal=USR2`` sends; a time limit leaving under ``STARTUP_S`` before it is
    refused), ``--requeue`` (a requeued job keeps its id, so the next stage's ``afterok`` still
    holds) and ``--kill-on-invalid-dep=yes``.
  * :mod:`mlmega.launch.job_main` records TERM/USR1/USR2 before anything is imported; submitit
    installs its own handlers before calling the job (USR2: checkpoint + requeue + exit, TERM:
    ignored); :class:`StageJob` replaces them at once (``signals.catch_early``), and training
    replaces those with its StopFlag: on TERM/USR1/USR2 every rank agrees, saves a checkpoint and
    training returns exit code 3.
  * After a USR1/USR2 (preemption warning, ``scancel --signal``), rank 0 runs ``scontrol requeue
    $SLURM_JOB_ID`` and every task waits to be stopped by it; SLURM starts the job again with the
    same id and it resumes from the checkpoint. At most ``MLMEGA_MAX_REQUEUES`` (``cluster.env``,
    default 3) restarts of a job: after that the job fails instead (``mlmega resume`` continues).
  * After a TERM (``scancel``, time limit, ``scontrol requeue`` from outside) the job just ends:
    SLURM records CANCELLED / TIMEOUT, or requeues it itself (``scontrol requeue``).
  * A job whose training stopped without finishing its stage fails (never exits 0), so a later stage
    can never start from a missing checkpoint.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mlmega.parallel.setup import RENDEZVOUS_PORTS
from mlmega.vcycle.run import COMPLETED

MAX_REQUEUES_ENV = "MLMEGA_MAX_REQUEUES"  # a cluster.env key: restarts allowed per job
DEFAULT_MAX_REQUEUES = 3
REQUEUE_GRACE_S = 120.0  # how long a task waits to be stopped by its job's requeue


@dataclass(frozen=True)
class StageJob:
    """What every task of a stage's job runs (pickled by submitit; must stay importable)."""

    run_dir: str
    stage: str
    config: str  # the stage's ``mlmega train`` config
    save_dir: str
    steps: int
    max_requeues: int = DEFAULT_MAX_REQUEUES
    requeue_grace_s: float = REQUEUE_GRACE_S

    def __call__(self) -> dict:
        from submitit.helpers import TorchDistributedEnvironment

        from mlmega.train import signals

        signals.catch_early()  # submitit's USR2 handler would requeue and exit on its own
        dist_env = TorchDistributedEnvironment()
        dist_env.master_addr = rendezvous_address(dist_env.master_addr)
        if not os.environ.get("MASTER_PORT"):  # cluster.env may set it: then as given
            dist_env.master_port = rendezvous_port(os.environ.get("SLURM_JOB_ID", "0"))
        dist_env.export(set_cuda_visible_devices=False, overwrite=True)
        rank, job_id = dist_env.rank, os.environ.get("SLURM_JOB_ID", "?")
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        summary = dict(stage=self.stage, job_id=job_id, rank=rank, restarts=restarts)
        _say(rank, f"{self.stage}: job {job_id}, {dist_env.world_size} rank(s), restart "
                   f"{restarts}, rendezvous {dist_env.master_addr}:{dist_env.master_port}")
        if _tracker_step(Path(self.save_dir)) == self.steps:  # a re-run of a finished stage
            _say(rank, f"{self.stage}: already finished (step {self.steps}); nothing to do")
            return dict(summary, status=COMPLETED)

        from mlmega.train.loop import main

        code = main(self.config)
        if code == 0:
            return dict(summary, status=COMPLETED)
        # Interrupted: a checkpoint was saved. Die promptly when SLURM stops the job from now on.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        received = signals.last_received
        name = signal.Signals(received).name if received else "none (exit_interval)"
        if received in (signal.SIGUSR1, signal.SIGUSR2):
            if restarts >= self.max_requeues:
                raise StageInterrupted(
                    f"{self.stage}: {name} after {restarts} restart(s): not requeued again "
                    f"({MAX_REQUEUES_ENV}={self.max_requeues}); `mlmega resume {self.run_dir}` "
                    f"continues from the checkpoint")
            if rank == 0:
                _say(rank, f"{self.stage}: {name}: checkpoint saved; requeueing job {job_id}")
                subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
            # The requeue stops every task of the job (TERM, then KILL); wait for it here rather
            # than exit, so that no task ends the job (as failed) before it is requeued.
            time.sleep(self.requeue_grace_s)
            raise StageInterrupted(f"{self.stage}: job {job_id} was not stopped by its requeue "
                                   f"within {self.requeue_grace_s:g} s")
        raise StageInterrupted(f"{self.stage}: stopped by signal {name} after saving a checkpoint; "
                               f"`mlmega resume {self.run_dir}` continues from it")


class StageInterrupted(RuntimeError):
    """A stage's training stopped (and saved) before its last step: the job must not succeed."""


def rendezvous_address(host: str) -> str:
    """``host`` when it resolves, else 127.0.0.1 (the local test cluster's fake nodes n1, n2...)."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except (OSError, UnicodeError):
        return "127.0.0.1"


def rendezvous_port(job_id: str) -> int:
    """The job's rendezvous port, the same on every task: seeded by the job id (jobs sharing a
    node get different ports) within [20000, 32768), below Linux's default ephemeral range.
    (submitit's seeded port spans 20000-60000: in CI one collided with a socket of SLURM's that
    the kernel had given an ephemeral port, and the job failed with EADDRINUSE.)"""
    return random.Random(job_id).randrange(*RENDEZVOUS_PORTS)


def _tracker_step(save_dir: Path) -> Optional[int]:
    from mlmega.checkpoint.directory import TRACKER

    try:
        return int((save_dir / TRACKER).read_text().strip())
    except (OSError, ValueError):
        return None


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[mlmega] {message}", flush=True)
