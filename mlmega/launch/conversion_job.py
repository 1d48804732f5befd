"""A checkpoint conversion as one SLURM job (submitit): task i of N converts tasks[i::N].

Each SLURM task writes its target ranks' files into the conversion's staging directory (on the
shared filesystem, next to ``--dst``); the submitting process waits for the job, and only when
every task succeeded writes the ``latest`` marker and renames the staging directory into place
(:func:`mlmega.checkpoint.convert.run_conversion`), so a failed or cancelled job publishes
nothing. Values that reach the sbatch script are checked to be one line of printable text.

The coordinator alone publishes, so a job whose coordinator died (``kill -9``, a lost login
session) would work for nothing: while it waits, the coordinator touches a heartbeat file in the
job folder, and every task cancels the job (``scancel``) once that file is ``orphan_after_s`` old.
The staging directory it leaves is removed by the next run on the coordinator's host
(:func:`mlmega.checkpoint.atomic.recover`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from mlmega.checkpoint.atomic import owner_tag
from mlmega.config.errors import ConfigError
from mlmega.launch.slurm import check_line, python_executable, submit


@dataclass(frozen=True)
class TaskShare:
    """What every SLURM task runs (pickled by submitit): its share of the conversion tasks,
    watched by :func:`cancel_when_orphaned`."""

    tasks: tuple
    heartbeat: str  # the file the coordinator touches while it waits
    orphan_after_s: float

    def __call__(self) -> list:
        from submitit import JobEnvironment

        from mlmega.checkpoint.convert import convert_share

        env = JobEnvironment()
        threading.Thread(target=cancel_when_orphaned, daemon=True,
                         args=(Path(self.heartbeat), self.orphan_after_s, env.job_id)).start()
        return convert_share(self.tasks[env.global_rank::env.num_tasks])


def cancel_when_orphaned(heartbeat: Path, after_s: float, job_id: str) -> None:
    """Cancel job ``job_id`` (and exit) once ``heartbeat`` is ``after_s`` old or gone: its
    coordinator died, and nobody would publish what the job writes."""
    while True:
        try:
            age = time.time() - heartbeat.stat().st_mtime
        except FileNotFoundError:
            age = float("inf")
        if age > after_s:
            print(f"mlmega: the coordinator stopped touching {heartbeat} ({age:.0f} s ago); "
                  f"cancelling job {job_id}", file=sys.stderr, flush=True)
            subprocess.run(["scancel", job_id], check=False)
            os._exit(1)
        time.sleep(max(0.2, after_s / 4))


@dataclass(frozen=True)
class SlurmConversion:
    """Runs conversion tasks as the ``ntasks`` tasks of one job on one node; a ``runner`` for
    run_conversion."""

    folder: Path  # submitit's scripts and logs (one sub-folder per job)
    ntasks: int = 1
    partition: Optional[str] = None
    time_limit_min: int = 60
    cpus_per_task: int = 1
    poll_s: float = 2.0
    orphan_after_s: float = 120.0  # the tasks cancel the job when the coordinator is gone this long

    def check(self) -> None:
        """Every value is inert in the sbatch script, and the sizes are positive."""
        check_line("--slurm-logs", str(self.folder))
        if self.partition is not None:
            check_line("--partition", self.partition)
        for key in ("ntasks", "time_limit_min", "cpus_per_task"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key}={getattr(self, key)!r}: expected a positive number")

    def __call__(self, tasks: Sequence[tuple], log=print) -> list:
        import submitit

        self.check()
        params = dict(job_name="mlmega-convert", nodes=1, ntasks_per_node=self.ntasks,
                      cpus_per_task=self.cpus_per_task, time=int(self.time_limit_min),
                      setup=['export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"'],
                      srun_args=["--kill-on-bad-exit=1"], wckey=None)  # no --wckey=submitit
        if self.partition:
            params["partition"] = self.partition
        executor = submitit.SlurmExecutor(folder=Path(self.folder).absolute() / "%j",
                                          python=python_executable())
        executor.update_parameters(**params)
        heartbeat = Path(self.folder).absolute() / f"coordinator-{owner_tag()}.alive"
        heartbeat.parent.mkdir(parents=True, exist_ok=True)
        heartbeat.touch()
        try:
            return self._run(executor, TaskShare(tuple(tasks), str(heartbeat),
                                                 self.orphan_after_s), heartbeat, log)
        finally:
            heartbeat.unlink(missing_ok=True)

    def _run(self, executor, share: TaskShare, heartbeat: Path, log) -> list:
        job = submit(executor, share, "the conversion job")
        log(f"convert: SLURM job {job.job_id} ({self.ntasks} tasks); logs in "
            f"{Path(self.folder).absolute() / job.job_id}")
        start, last = time.monotonic(), 0.0
        while not job.done():
            heartbeat.touch()
            if time.monotonic() - last >= 30:
                last = time.monotonic()
                log(f"convert: job {job.job_id} {job.state} ({time.monotonic() - start:.0f} s)")
            time.sleep(self.poll_s)
        try:
            per_task = job.results()
        except Exception as err:  # submitit's FailedJobError / UncompletedJobError
            raise RuntimeError(f"SLURM job {job.job_id} failed ({job.state}): {err}") from None
        return [r for results in per_task for r in results]
