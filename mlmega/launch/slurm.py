"""Run a V-cycle's stages as a chain of SLURM jobs (submitit), one job per stage.

``launch`` submits every stage that is not completed through submitit and returns at once: each
stage is one sbatch job sized by the plan (``stage.resources``: nodes x ranks per node, exactly the
stage's TP x PP x DP ranks, one GPU per rank on GPU clusters; ``--time`` from the stage's planned
time, :mod:`mlmega.vcycle.time_limits`), held with ``--dependency=afterok:<previous stage's job>``,
so SLURM starts it only when the previous stage's job *succeeded*. Job ids and statuses go to
``RUN_DIR/state.json``; ``refresh`` reads them back from ``sacct`` (one call for all jobs) and from
the checkpoints.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from mlmega.config.errors import ConfigError
from mlmega.launch.executor import Executor
from mlmega.launch.sbatch import (check, check_partition, max_requeues, render, sbatch_parameters,
                                  stage_executor, submit, submitit_folder)
from mlmega.launch.slurm_job import StageJob
from mlmega.launch.slurm_queue import ACTIVE, ENDING, WAITING, query, scancel, squeue, stage_status
from mlmega.vcycle.plan import Plan, Stage
from mlmega.vcycle.run import (CANCELLED, COMPLETED, FAILED, FINAL_STATES, SUBMITTED, RunState,
                               stage_config_path, stage_dir, stage_finished)
from mlmega.vcycle.time_limits import stage_time_limit


class SlurmExecutor(Executor):
    """Each stage is one SLURM job (submitit), chained with ``afterok`` dependencies."""

    name = "slurm"

    def check(self, plan: Plan, run_dir: Path) -> None:
        check(plan, run_dir)

    def check_cluster(self, plan: Plan) -> None:
        check_partition(plan)

    def describe(self, plan: Plan, run_dir: Path) -> str:
        check(plan, run_dir)
        cluster = plan.recipe.cluster
        python = (f"{cluster.python} (cluster.python)" if cluster.python else
                  f"{sys.executable} (the interpreter running mlmega"
                  + (", not one cluster.setup activates" if cluster.setup else "")
                  + "; cluster.python sets the cluster's)")
        parts, previous = [f"# job environment: python {python}; cluster.setup: "
                           f"{len(cluster.setup)} line(s); wckey: {cluster.wckey or 'none'}"], None
        for stage in plan.stages:
            res = stage.resources
            dependency = f"afterok:<job id of {previous.name}>" if previous else None
            limit = stage_time_limit(plan, stage, run_dir)
            parts.append(f"# ===== {stage.name}: level {stage.level}, {stage.steps} steps, "
                         f"{res.nodes} node(s) x {res.tasks_per_node} rank(s), TP/PP/DP "
                         f"{res.tp}/{res.pp}/{res.dp}; logs: {submitit_folder(run_dir, stage)}\n"
                         f"# time limit {limit.minutes} min: {limit.source}\n"
                         + render(plan, stage, run_dir, dependency))
            previous = stage
        chain = " -> ".join(s.name for s in plan.stages)
        parts.append(f"# dependency chain (each job starts when the one before succeeded, "
                     f"afterok): {chain}\n")
        return "\n".join(parts)

    def launch(self, state: RunState, plan: Plan, log=print) -> None:
        run_dir = Path(state.run_dir)
        check(plan, run_dir)
        requeues = max_requeues(plan)
        for stage in plan.stages:  # fail on a bad stage before submitting anything
            sbatch_parameters(plan, stage, run_dir)
        # squeue (slurmctld itself, no accounting lag): which earlier jobs are still queued/running
        known = squeue([state.stage(s.name).job_id for s in plan.stages
                        if state.stage(s.name).status != COMPLETED and state.stage(s.name).job_id])
        actions: list[tuple[Stage, Optional[str]]] = []  # (stage, job id kept) in order
        stale: list[str] = []
        ending: dict[str, str] = {}  # stage -> its previous job, still ending: start after it
        replaced = False  # a stage before this one gets a new job: later jobs must follow it
        for stage in plan.stages:
            entry = state.stage(stage.name)
            if entry.status == COMPLETED or stage_finished(run_dir, stage):
                if entry.status != COMPLETED:
                    entry.status = COMPLETED
                continue
            info = known.get(entry.job_id) if entry.job_id else None
            alive = info is not None and info.state in WAITING | ACTIVE - ENDING and \
                info.reason != "DependencyNeverSatisfied"
            if alive and not replaced:
                actions.append((stage, entry.job_id))
                continue
            if alive:
                stale.append(entry.job_id)
            if info is not None and info.state in ENDING:  # e.g. cancelled, still saving
                ending[stage.name] = entry.job_id
            replaced = True
            actions.append((stage, None))
        state.save()
        if stale:
            scancel(stale)
        previous: Optional[str] = None
        submitted: list[str] = []  # this call's new jobs, for an error after some were submitted
        for stage, kept in actions:
            entry = state.stage(stage.name)
            if kept:
                entry.status = stage_status(known[kept]) or SUBMITTED
                log(f"[{stage.name}] job {kept} is still {known[kept].state.lower()}: kept")
                previous = kept
                state.save()
                continue
            # afterok: the stage before succeeded (none when it had completed already);
            # afterany: this stage's previous job has ended (it may still be writing a checkpoint)
            dependency = ",".join(d for d in (f"afterok:{previous}" if previous else "",
                                              f"afterany:{ending[stage.name]}"
                                              if stage.name in ending else "") if d) or None
            try:
                job_id = self._submit(plan, stage, run_dir, dependency, requeues)
            except ConfigError as err:
                queued = (f"{', '.join(submitted)} stay(s) queued" if submitted else
                          "nothing was submitted")
                raise ConfigError(f"{err}; {queued} (`mlmega resume {run_dir}` retries)") \
                    from None
            entry.job_id, entry.status, entry.attempts = job_id, SUBMITTED, entry.attempts + 1
            entry.started = entry.ended = entry.exit_code = None
            state.save()
            res = stage.resources
            log(f"[{stage.name}] submitted job {job_id}"
                + (f" ({dependency})" if dependency else "")
                + f": {res.nodes} node(s) x {res.tasks_per_node} rank(s); logs "
                  f"{submitit_folder(run_dir, stage).parent / job_id}")
            previous = job_id
            submitted.append(f"{stage.name} (job {job_id})")

    def _submit(self, plan: Plan, stage: Stage, run_dir: Path, dependency: Optional[str],
                requeues: int) -> str:
        job = StageJob(run_dir=str(run_dir), stage=stage.name,
                       config=str(stage_config_path(run_dir, stage.name)),
                       save_dir=str(stage_dir(run_dir, stage.name)), steps=stage.steps,
                       max_requeues=requeues)
        return submit(stage_executor(plan, stage, run_dir, dependency), job, stage.name).job_id

    def refresh(self, state: RunState, plan: Plan) -> None:
        run_dir = Path(state.run_dir)
        entries = [state.stage(s.name) for s in plan.stages]
        known = query([e.job_id for e in entries if e.job_id])
        for stage, entry in zip(plan.stages, entries):
            info = known.get(entry.job_id) if entry.job_id else None
            finished = stage_finished(run_dir, stage)
            if info is not None:
                if info.wall_s is not None:
                    entry.wall[entry.job_id] = info.wall_s
                entry.started = info.start or entry.started
                entry.ended = info.end or (None if info.state in WAITING | ACTIVE
                                           else entry.ended)
                ended = [[start, end] for start, end in info.runs if end is not None]
                if ended:
                    entry.spans[entry.job_id] = ended
                if info.exit_code is not None and info.state not in WAITING | ACTIVE:
                    entry.exit_code = info.exit_code
            if entry.status == COMPLETED:
                continue
            if finished and (info is None or info.state not in WAITING):
                entry.status = COMPLETED
            elif info is not None:
                entry.status = stage_status(info) or entry.status
        # Jobs whose afterok can no longer be met (an earlier stage failed or was cancelled).
        orphans, broken = [], False
        for entry in entries:
            info = known.get(entry.job_id) if entry.job_id else None
            waiting = entry.status == SUBMITTED and info is not None and info.state in WAITING
            if waiting and (broken or info.reason == "DependencyNeverSatisfied"):
                orphans.append(entry.job_id)
                entry.status = CANCELLED
            broken = broken or entry.status in (FAILED, CANCELLED)
        if orphans:
            scancel(orphans)

    def cancel(self, state: RunState) -> None:
        unfinished = [e for e in state.stages if e.status not in FINAL_STATES]
        jobs = [e.job_id for e in unfinished if e.job_id]
        if jobs:
            scancel(reversed(jobs))  # later stages first: no dependency races
        for entry in unfinished:
            entry.status = CANCELLED
        state.save()
