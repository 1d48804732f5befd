"""A checkpoint conversion as one SLURM job (submitit): task i of N converts tasks[i::N].

Each SLURM task writes its target ranks' files into the conversion's staging directory (on the
shared filesystem, next to ``--dst``); the submitting process waits for the job, and only when
every task succeeded writes the ``latest`` marker and renames the staging directory into place
(:func:`mlmega.checkpoint.convert.run_conversion`), so a failed or cancelled job publishes
nothing. Values that reach the sbatch script are checked to be one line of printable text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from mlmega.config.errors import ConfigError
from mlmega.launch.slurm import check_line, python_executable, submit


@dataclass(frozen=True)
class TaskShare:
    """What every SLURM task runs (pickled by submitit): its share of the conversion tasks."""

    tasks: tuple

    def __call__(self) -> list:
        from submitit import JobEnvironment

        from mlmega.checkpoint.convert import convert_share

        env = JobEnvironment()
        return convert_share(self.tasks[env.global_rank::env.num_tasks])


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
        job = submit(executor, TaskShare(tuple(tasks)), "the conversion job")
        log(f"convert: SLURM job {job.job_id} ({self.ntasks} tasks); logs in "
            f"{Path(self.folder).absolute() / job.job_id}")
        start, last = time.monotonic(), 0.0
        while not job.done():
            if time.monotonic() - last >= 30:
                last = time.monotonic()
                log(f"convert: job {job.job_id} {job.state} ({time.monotonic() - start:.0f} s)")
            time.sleep(self.poll_s)
        try:
            per_task = job.results()
        except Exception as err:  # submitit's FailedJobError / UncompletedJobError
            raise RuntimeError(f"SLURM job {job.job_id} failed ({job.state}): {err}") from None
        return [r for results in per_task for r in results]
