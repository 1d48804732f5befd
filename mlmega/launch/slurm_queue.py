"""What SLURM says about jobs: one ``sacct`` call for all of a run's jobs, ``squeue`` for the rest.

submitit's own watcher (``SlurmInfoWatcher``) batches sacct too, but reads only JobID/State/NodeList:
the executor also needs exit codes, start/end times and the pending reason (DependencyNeverSatisfied).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Optional, Sequence

from mlmega.config.errors import ConfigError
from mlmega.vcycle.run import CANCELLED, FAILED, RUNNING, SUBMITTED

# sbatch states (sacct/squeue) -> stage statuses
WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED",
           "SPECIAL_EXIT"}
ACTIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING",
          "STOPPED"}
ENDING = {"COMPLETING", "SIGNALING", "STAGE_OUT"}  # processes may still run (and save)
_FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
_MAYBE_REQUEUED = {"PREEMPTED", "NODE_FAIL"}  # with --requeue SLURM puts these back in the queue


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str  # first word of sacct's State ("CANCELLED by 0" -> CANCELLED)
    exit_code: Optional[int] = None
    start: Optional[float] = None
    end: Optional[float] = None
    reason: str = ""
    runs: tuple[tuple[float, Optional[float]], ...] = ()  # (start, end) of each run that started
    # (a requeue runs the job again under its id; end None: still running)

    @property
    def wall_s(self) -> Optional[float]:
        """Seconds over every run of the job (a running one: so far); None before any ran."""
        if not self.runs:
            return None
        return sum((time.time() if end is None else end) - start for start, end in self.runs)


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)


def _time(text: str) -> Optional[float]:
    try:
        return datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:  # Unknown, None, ""
        return None


SACCT_FIELDS = ("JobID", "State", "ExitCode", "Start", "End", "Reason")


def sacct(job_ids: Sequence[str]) -> Optional[dict[str, JobInfo]]:
    """One ``sacct`` call for all ``job_ids``: each job's latest run, with the start and end of
    all its runs (``-D``: a requeued job's earlier runs too); None when sacct fails."""
    if not job_ids:
        return {}
    try:
        done = _run(["sacct", "-X", "-D", "-n", "-P", "-o", ",".join(SACCT_FIELDS), "-j",
                     ",".join(job_ids)])
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    out: dict[str, JobInfo] = {}
    for line in done.stdout.splitlines():  # oldest run first
        row = dict(zip(SACCT_FIELDS, line.split("|")))
        if row.get("JobID") not in job_ids:
            continue
        code = row.get("ExitCode", "").split(":")[0]
        start, end = _time(row.get("Start", "")), _time(row.get("End", ""))
        runs = out[row["JobID"]].runs if row["JobID"] in out else ()
        out[row["JobID"]] = JobInfo(row["JobID"], (row.get("State") or "UNKNOWN").split()[0],
                                    int(code) if code.isdigit() else None, start, end,
                                    row.get("Reason", ""),
                                    runs + (((start, end),) if start is not None else ()))
    return out


def squeue(job_ids: Sequence[str]) -> dict[str, JobInfo]:
    """The jobs of ``job_ids`` that SLURM still holds (queued or running)."""
    if not job_ids:
        return {}
    try:
        done = _run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"])
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in done.stdout.splitlines():
        job_id, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        if job_id in job_ids:
            out[job_id] = JobInfo(job_id, state.strip(), reason=reason.strip())
    return out


def query(job_ids: Sequence[str]) -> dict[str, JobInfo]:
    """sacct for all jobs; squeue for those sacct does not know (yet) or may have requeued."""
    job_ids = [j for j in dict.fromkeys(job_ids) if j]
    rows = sacct(job_ids)
    if rows is None:  # no accounting: what the queue still holds; the rest have ended
        rows = {}
    unsure = [j for j in job_ids if j not in rows or rows[j].state in _MAYBE_REQUEUED]
    if unsure:
        queued = squeue(unsure)
        for job_id in unsure:
            if job_id in queued:
                rows[job_id] = queued[job_id]
            elif job_id not in rows:
                rows[job_id] = JobInfo(job_id, "GONE")
    return rows


def stage_status(info: JobInfo) -> Optional[str]:
    """A stage's status from its job's state (COMPLETED is checked against the checkpoint first)."""
    if info.state in WAITING:
        return SUBMITTED
    if info.state in ACTIVE:
        return RUNNING
    if info.state in _FAILED or info.state in ("COMPLETED", "NODE_FAIL", "GONE"):
        return FAILED  # COMPLETED without the stage's last checkpoint: it did not finish
    if info.state in ("CANCELLED", "PREEMPTED"):
        return CANCELLED
    return None  # unknown: keep what the state file says


def scancel(job_ids: Sequence[str]) -> None:
    """Cancel ``job_ids`` (in the order given)."""
    _run(["scancel", *job_ids])


def partitions() -> Optional[list[str]]:
    """The cluster's partition names (``sinfo``); None where sinfo is not installed."""
    try:
        done = _run(["sinfo", "-h", "-o", "%R"])
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        raise ConfigError(f"sinfo failed (is the cluster reachable?): {done.stderr.strip()}")
    return sorted(set(done.stdout.split()))
