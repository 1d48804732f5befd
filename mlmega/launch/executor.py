"""Executors run a V-cycle's stages as jobs: locally (one stage after another) or on SLURM.

An executor knows jobs, not tensors: it starts ``mlmega train STAGE.yaml`` on the stage's ranks,
records job ids and statuses in the run state, and cancels them.
"""

from __future__ import annotations

import abc
import os
import signal
import time
from pathlib import Path

from mlmega.launch.local import run_ranks_locally
from mlmega.train.signals import EXIT_INTERRUPTED
from mlmega.vcycle.lock import holder
from mlmega.vcycle.plan import Plan
from mlmega.vcycle.run import (CANCELLED, COMPLETED, FAILED, FINAL_STATES, RUNNING, RunState,
                               stage_config_path, stage_finished)


class Executor(abc.ABC):
    name: str

    @abc.abstractmethod
    def launch(self, state: RunState, plan: Plan, log=print) -> None:
        """Start every stage that is not completed (in order; later ones after earlier ones)."""

    @abc.abstractmethod
    def describe(self, plan: Plan, run_dir: Path) -> str:
        """What ``launch`` would start, for --dry-run (sbatch scripts, or commands)."""

    @abc.abstractmethod
    def refresh(self, state: RunState, plan: Plan) -> None:
        """Update stage statuses (in memory) from what the jobs did."""

    @abc.abstractmethod
    def cancel(self, state: RunState) -> None:
        """Stop every unfinished stage."""

    def check(self, plan: Plan, run_dir: Path) -> None:
        """Raise ConfigError for what this executor cannot start (called before the run directory
        is written or anything is submitted)."""

    def check_cluster(self, plan: Plan) -> None:
        """Raise ConfigError for what the cluster itself refuses (asked of the cluster; called
        before the run directory is written, not for --dry-run)."""


class LocalExecutor(Executor):
    """Runs the stages here, one after another, each as ``world`` local processes (gloo)."""

    name = "local"

    def describe(self, plan: Plan, run_dir: Path) -> str:
        return "\n".join(f"{s.name}: mlmega train {stage_config_path(run_dir, s.name)} --nproc "
                         f"{s.resources.world}" for s in plan.stages)

    def launch(self, state: RunState, plan: Plan, log=print) -> None:
        run_dir = Path(state.run_dir)
        for entry in state.stages:
            stage = plan.stage(entry.name)
            if entry.status == COMPLETED:
                continue
            if stage_finished(run_dir, stage):
                entry.status = COMPLETED
                state.save()
                continue
            entry.status, entry.job_id = RUNNING, f"local:{os.getpid()}"
            entry.attempts += 1
            entry.started, entry.ended = time.time(), None
            state.save()
            log_dir = local_log_dir(run_dir, stage.name, entry.job_id)
            log(f"[{stage.name}] level {stage.level}: {stage.model.num_layers}L-"
                f"{stage.model.hidden_size}, {stage.steps} steps on {stage.resources.world} "
                f"rank(s); logs {log_dir}")
            code = run_ranks_locally(["train", str(stage_config_path(run_dir, stage.name))],
                                     stage.resources.world, log_dir=log_dir, job=log_dir.name)
            entry.exit_code, entry.ended = code, time.time()
            entry.wall[entry.job_id] = entry.ended - entry.started
            entry.spans[entry.job_id] = [[entry.started, entry.ended]]
            entry.status = COMPLETED if code == 0 and stage_finished(run_dir, stage) else \
                CANCELLED if code in (EXIT_INTERRUPTED, -signal.SIGTERM) else FAILED
            if entry.status == CANCELLED:  # `mlmega cancel` stops the whole run
                for later in state.stages:
                    if later.status not in FINAL_STATES:
                        later.status = CANCELLED
            state.save()
            if entry.status != COMPLETED:
                log(f"[{stage.name}] {entry.status} (exit code {code}); `mlmega resume "
                    f"{run_dir}` continues from its latest checkpoint")
                return

    def refresh(self, state: RunState, plan: Plan) -> None:
        # a local stage runs while its coordinator ("local:PID") holds the run's writer lock
        coordinator = holder(Path(state.run_dir))
        for entry in state.stages:
            stage = plan.stage(entry.name)
            if entry.status != RUNNING or not entry.job_id:
                continue
            if coordinator is not None and entry.job_id == f"local:{coordinator.pid}":
                entry.wall[entry.job_id] = time.time() - (entry.started or time.time())
            else:
                entry.status = COMPLETED if stage_finished(Path(state.run_dir), stage) else FAILED

    def cancel(self, state: RunState) -> None:
        """Mark the unfinished stages cancelled (the caller has stopped the coordinator first:
        :func:`mlmega.vcycle.lock.stop_local_holder`)."""
        for entry in state.stages:
            if entry.status not in FINAL_STATES:
                entry.status = CANCELLED
        state.save()


def local_log_dir(run_dir: Path, stage: str, job_id: str) -> Path:
    """Where a local job keeps its ranks' logs, ``JOB_RANK_log.out``/``.err`` (as SLURM's jobs do
    under ``RUN_DIR/submitit/STAGE/JOB``)."""
    return Path(run_dir) / "logs" / stage / job_id.replace(":", "-")

