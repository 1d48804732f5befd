"""Run a V-cycle's stages as a chain of SLURM jobs (submitit), one job per stage.

``launch`` submits every stage that is not completed through submitit and returns at once: each
stage is one sbatch job sized by the plan (``stage.resources``: nodes x ranks per node, exactly the
stage's TP x PP x DP ranks, one GPU per rank on GPU clusters; ``--time`` from the stage's planned
time, :mod:`mlmega.vcycle.time_limits`), held with ``--dependency=afterok:<previous stage's job>``,
so SLURM starts it only when the previous stage's job *succeeded*. Job ids and statuses go to
``RUN_DIR/state.json``; ``refresh`` reads them back from ``sacct`` (one call for all jobs) and from
the checkpoints.

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

Everything from the recipe that reaches the sbatch script is inert: #SBATCH values are checked for
newlines and control characters (ConfigError naming the key) and quoted; ``cluster.env`` values are
exported as ``export KEY='value'`` (shell-quoted; KEY must be an identifier); paths are quoted.
``cluster.setup`` lines are shell by design (``module load ...``, ``source venv/bin/activate``):
they run as written, so they come from the user's own recipe only; a line may not contain a NUL or
a line break.
"""

from __future__ import annotations

import math
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import submitit

from mlmega.config.errors import ConfigError
from mlmega.parallel.setup import RENDEZVOUS_PORTS
from mlmega.launch.executor import Executor
from mlmega.vcycle.plan import Plan, Stage
from mlmega.vcycle.run import (CANCELLED, COMPLETED, FAILED, FINAL_STATES, RUNNING, SUBMITTED,
                               RunState, stage_config_path, stage_dir, stage_finished)
from mlmega.vcycle.time_limits import TimeLimit, check_time_limits, stage_time_limit

MAX_REQUEUES_ENV = "MLMEGA_MAX_REQUEUES"  # a cluster.env key: restarts allowed per job
DEFAULT_MAX_REQUEUES = 3
SIGNAL_DELAY_S = 90  # USR2 this long before the time limit (submitit's default)
STARTUP_S = 120  # a job's time limit leaves at least this long before its USR2 warning
REQUEUE_GRACE_S = 120.0  # how long a task waits to be stopped by its job's requeue

# sbatch states (sacct/squeue) -> stage statuses
_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED",
            "SPECIAL_EXIT"}
_ACTIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING",
           "STOPPED"}
_FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
_ENDING = {"COMPLETING", "SIGNALING", "STAGE_OUT"}  # processes may still run (and save)
_MAYBE_REQUEUED = {"PREEMPTED", "NODE_FAIL"}  # with --requeue SLURM puts these back in the queue

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINE_BREAK = re.compile(r"[\x00\n\r]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SBATCH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_SIGNAL_SPEC = re.compile(r"(SIG)?USR[12](@\d+)?")
# sbatch options mlmega sets itself: the chain, the requeue, the logs and the plan's sizing
_RESERVED = {"dependency", "array", "output", "error", "open-mode", "requeue", "no-requeue",
             "kill-on-invalid-dep", "nodes", "ntasks", "ntasks-per-node", "wrap", "parsable"}
_FIELDS = {"partition": "partition", "account": "account", "qos": "qos",
           "constraint": "constraint", "time": "time_limit_min", "mem": "mem_gb",
           "cpus-per-task": "cpus_per_task", "gpus-per-node": "gpus_per_node", "job-name": None,
           "wckey": "wckey"}


# ---------------------------------------------------------------- the job (runs on every task)
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
    from mlmega.checkpoint.torch_format import TRACKER

    try:
        return int((save_dir / TRACKER).read_text().strip())
    except (OSError, ValueError):
        return None


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[mlmega] {message}", flush=True)


# ---------------------------------------------------------------- rendering
def submitit_folder(run_dir: Path, stage: Stage) -> Path:
    """Where submitit keeps a stage's scripts, pickles and logs (``%j``: one folder per job)."""
    return Path(run_dir).absolute() / "submitit" / stage.name / "%j"


def python_executable(python: Optional[str] = None) -> str:
    """``python`` (default: this interpreter), shell-quoted: what the job runs."""
    return shlex.quote(python or sys.executable)


def _command(folder: Path, python: str) -> str:
    """What every task runs under srun: :mod:`mlmega.launch.job_main` (``python`` quoted)."""
    return " ".join([python, "-u -m mlmega.launch.job_main", shlex.quote(str(folder))])


class StageExecutor(submitit.SlurmExecutor):
    """submitit's SLURM executor, starting each task through :mod:`mlmega.launch.job_main`."""

    @property
    def _submitit_command_str(self) -> str:
        return _command(self.folder, self.python)


def stage_executor(plan: Plan, stage: Stage, run_dir: Path,
                   dependency: Optional[str] = None) -> StageExecutor:
    """The executor that submits ``stage``'s job (needs srun on the PATH)."""
    executor = StageExecutor(folder=submitit_folder(run_dir, stage),
                             python=python_executable(plan.recipe.cluster.python))
    executor.update_parameters(**sbatch_parameters(plan, stage, run_dir, dependency))
    return executor


def submit(executor, fn, what: str):
    """``executor.submit(fn)``; ConfigError naming ``what`` when sbatch refuses the job."""
    from submitit.helpers import clean_env

    try:
        if "SLURM_JOB_ID" in os.environ:  # inside a job: its SLURM_* would leak into the child
            conf = os.environ.get("SLURM_CONF")
            with clean_env():
                if conf:
                    os.environ["SLURM_CONF"] = conf
                return executor.submit(fn)
        return executor.submit(fn)
    except (RuntimeError, subprocess.CalledProcessError, OSError) as err:
        raise ConfigError(f"sbatch refused {what}: {err}") from None


def max_requeues(plan: Plan) -> int:
    value = plan.recipe.cluster.env.get(MAX_REQUEUES_ENV, DEFAULT_MAX_REQUEUES)
    try:
        count = int(str(value))
    except ValueError:
        count = -1
    if count < 0:
        raise ConfigError(f"{plan.recipe.source}: cluster.env.{MAX_REQUEUES_ENV}={value!r}: "
                          f"expected a whole number >= 0")
    return count


def sbatch_parameters(plan: Plan, stage: Stage, run_dir: Path,
                      dependency: Optional[str] = None) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters of one stage's job (validated: see :func:`check`)."""
    cluster, res = plan.recipe.cluster, stage.resources
    params: dict[str, Any] = dict(
        job_name=f"mlmega-{plan.recipe.name}-{stage.name}",
        time=stage_time_limit(plan, stage, run_dir).minutes, nodes=res.nodes,
        ntasks_per_node=res.tasks_per_node, cpus_per_task=cluster.cpus_per_task,
        signal_delay_s=SIGNAL_DELAY_S, setup=setup_lines(plan, stage, run_dir),
        srun_args=["--kill-on-bad-exit=1"], wckey=cluster.wckey or None)  # None: no --wckey
    if res.gpus_per_node > 0:
        # one GPU per rank, all of them visible to every rank of the node (NVLink P2P)
        params["gpus_per_node"] = res.tasks_per_node
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(cluster, key)
        if value not in (None, ""):
            params[key] = str(value)
    if cluster.mem_gb:
        params["mem"] = _mem(cluster.mem_gb)
    extra: dict[str, Any] = {"requeue": True, "kill-on-invalid-dep": "yes"}
    extra.update(_extra_sbatch(plan))
    if dependency:
        extra["dependency"] = dependency
    params["additional_parameters"] = extra
    return params


def _mem(mem_gb: float) -> str:
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def setup_lines(plan: Plan, stage: Stage, run_dir: Path) -> list[str]:
    """The job script's lines before srun: mlmega's exports, cluster.env (quoted), cluster.setup."""
    cluster, res = plan.recipe.cluster, stage.resources
    lines = ["# mlmega: the run (values quoted)",
             f"export MLMEGA_RUN_DIR={shlex.quote(str(Path(run_dir).absolute()))}",
             f"export MLMEGA_STAGE={shlex.quote(stage.name)}",
             '# srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05)',
             'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"',
             "# each rank's intra-op threads: its own CPUs (cluster.env may override)",
             'export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK"']
    if res.gpus_per_node > 0 and res.tp > 1:
        lines.append("export CUDA_DEVICE_MAX_CONNECTIONS=1  # TP > 1 (set before Python starts)")
    if cluster.env:
        lines.append("# cluster.env (values quoted)")
        lines += [f"export {key}={shlex.quote(str(value))}" for key, value in cluster.env.items()]
    if cluster.setup:
        lines.append("# cluster.setup (shell lines from the recipe, run as written)")
        lines += list(cluster.setup)
    return lines


def _extra_sbatch(plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    source = plan.recipe.source
    for i, item in enumerate(plan.recipe.cluster.extra_sbatch):
        where = f"{source}: cluster.extra_sbatch[{i}]"
        check_line(where, item)
        if not item.startswith("--"):
            raise ConfigError(f"{where}={item!r}: expected '--key=value' or '--flag'")
        key, eq, value = item[2:].partition("=")
        if not _SBATCH_KEY.fullmatch(key):
            raise ConfigError(f"{where}={item!r}: {key!r} is not an sbatch option name")
        key = key.lower()
        if key in _RESERVED:
            raise ConfigError(f"{where}={item!r}: --{key} is set by mlmega (dependency chain, "
                              f"requeue, logs, or the plan's sizing)")
        if key in _FIELDS:
            field = _FIELDS[key]
            raise ConfigError(f"{where}={item!r}: use " +
                              (f"cluster.{field}" if field else "the recipe's name") +
                              f" instead of --{key}")
        if key == "signal" and not _SIGNAL_SPEC.fullmatch(value):
            raise ConfigError(f"{where}={item!r}: expected --signal=USR1@SECONDS or USR2@SECONDS "
                              f"(sent to every task; no B: prefix)")
        out[key] = value if eq else True
    return out


def check_line(where: str, value: str) -> None:
    """ConfigError naming ``where`` unless ``value`` is one line of printable text."""
    bad = _CONTROL.search(value)
    if bad:
        raise ConfigError(f"{where}={value!r}: contains the control character "
                          f"U+{ord(bad.group()):04X} (a line break would inject a new line into "
                          f"the sbatch script); values must be one line of printable text")


def check(plan: Plan, run_dir: Path) -> None:
    """Every value that reaches the sbatch script is inert, and every stage fits the cluster."""
    recipe, cluster, source = plan.recipe, plan.recipe.cluster, plan.recipe.source
    check_line(f"{source}: name", str(recipe.name))
    check_line("--run-dir", str(run_dir))
    check_line(f"{source}: cluster.python" if cluster.python else "python executable",
               cluster.python or sys.executable)
    for key in ("partition", "account", "qos", "constraint", "wckey"):  # types: the recipe's
        value = getattr(cluster, key)
        if value is not None:
            check_line(f"{source}: cluster.{key}", value)
    _extra_sbatch(plan)
    for i, line in enumerate(cluster.setup):
        bad = _LINE_BREAK.search(line)
        if bad:
            raise ConfigError(f"{source}: cluster.setup[{i}]={line!r}: contains "
                              f"U+{ord(bad.group()):04X}; give one shell line per list item")
    if not isinstance(cluster.env, Mapping):
        raise ConfigError(f"{source}: cluster.env: expected a mapping of NAME: value")
    for key, value in cluster.env.items():
        if not isinstance(key, str) or not _IDENTIFIER.fullmatch(key):
            raise ConfigError(f"{source}: cluster.env: {key!r} is not a valid environment "
                              f"variable name (letters, digits, _; not starting with a digit)")
        if isinstance(value, (dict, list, tuple)) or value is None:
            raise ConfigError(f"{source}: cluster.env.{key}={value!r}: expected a string")
        if "\x00" in str(value):
            raise ConfigError(f"{source}: cluster.env.{key}: contains a NUL character")
    requeues = max_requeues(plan)
    check_time_limits(plan)
    for stage in plan.stages:
        res = stage.resources
        if res.nodes > cluster.max_nodes:
            raise ConfigError(f"{source}: {stage.name} needs {res.nodes} node(s) "
                              f"({res.world} ranks, {res.tasks_per_node} per node) but "
                              f"cluster.max_nodes={cluster.max_nodes}")
        _check_time_limit(plan, stage, stage_time_limit(plan, stage, run_dir), requeues)


def _check_time_limit(plan: Plan, stage: Stage, limit: TimeLimit, requeues: int) -> None:
    """The job has time to start before its USR2 warning, and its requeues cover the stage."""
    where, delay = f"{plan.recipe.source}: {stage.name}", _signal_delay_s(plan)
    if limit.minutes * 60 < delay + STARTUP_S:
        raise ConfigError(f"{where}: time limit {limit.minutes} min ({limit.source}) leaves under "
                          f"{STARTUP_S} s to start before the USR2 warning {delay} s before its "
                          f"end; give it at least {math.ceil((delay + STARTUP_S) / 60)} min")
    runs = 1 + requeues
    if limit.planned_min and limit.planned_min > runs * (limit.minutes - delay / 60):
        raise ConfigError(f"{where}: time limit {limit.minutes} min x {runs} run(s) "
                          f"({MAX_REQUEUES_ENV}={requeues} requeues) is less than its planned "
                          f"{limit.planned_min:.0f} min; raise cluster.time_limit_min, "
                          f"cluster.time_limits.{stage.name} or cluster.env.{MAX_REQUEUES_ENV} "
                          f"(the limit: {limit.source})")


def _signal_delay_s(plan: Plan) -> int:
    """Seconds between the USR warning and the time limit (cluster.extra_sbatch may set it)."""
    spec = _extra_sbatch(plan).get("signal")
    if not isinstance(spec, str):
        return SIGNAL_DELAY_S
    _, at, seconds = spec.partition("@")
    return int(seconds) if at else 60  # sbatch's default for --signal=SIG without @


def check_partition(plan: Plan) -> None:
    """The recipe's partition(s) exist on the cluster (``sinfo``); skipped where sinfo is not."""
    cluster = plan.recipe.cluster
    if not cluster.partition:
        return
    try:
        done = _run(["sinfo", "-h", "-o", "%R"])
    except (OSError, subprocess.TimeoutExpired):
        return
    if done.returncode != 0:
        raise ConfigError(f"sinfo failed (is the cluster reachable?): {done.stderr.strip()}")
    known = sorted(set(done.stdout.split()))
    for name in cluster.partition.split(","):
        if name not in known:
            raise ConfigError(f"{plan.recipe.source}: cluster.partition={name!r}: no such "
                              f"partition on this cluster; sinfo lists {known}")


def render(plan: Plan, stage: Stage, run_dir: Path, dependency: Optional[str] = None) -> str:
    """The sbatch script submitit submits for ``stage`` (the same function renders both)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = submitit_folder(run_dir, stage)
    return _make_sbatch_string(command=_command(folder, python_executable(
        plan.recipe.cluster.python)), folder=folder,
        **sbatch_parameters(plan, stage, run_dir, dependency))


# ---------------------------------------------------------------- scheduler queries
@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str  # first word of sacct's State ("CANCELLED by 0" -> CANCELLED)
    exit_code: Optional[int] = None
    start: Optional[float] = None
    end: Optional[float] = None
    reason: str = ""
    wall_s: Optional[float] = None  # over every run of the job (a requeue runs it again)


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)


def _time(text: str) -> Optional[float]:
    try:
        return datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:  # Unknown, None, ""
        return None


SACCT_FIELDS = ("JobID", "State", "ExitCode", "Start", "End", "Reason")


def sacct(job_ids: Sequence[str]) -> Optional[dict[str, JobInfo]]:
    """One ``sacct`` call for all ``job_ids``: each job's latest run, with the wall time of all
    its runs (``-D``: a requeued job's earlier runs too); None when sacct fails."""
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
        runs = [out[row["JobID"]].wall_s if row["JobID"] in out else None,
                None if start is None else (end or time.time()) - start]
        wall = sum(r for r in runs if r is not None) if any(r is not None for r in runs) \
            else None
        out[row["JobID"]] = JobInfo(row["JobID"], (row.get("State") or "UNKNOWN").split()[0],
                                    int(code) if code.isdigit() else None, start, end,
                                    row.get("Reason", ""), wall)
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


def _status(info: JobInfo) -> Optional[str]:
    """A stage's status from its job's state (COMPLETED is checked against the checkpoint first)."""
    if info.state in _WAITING:
        return SUBMITTED
    if info.state in _ACTIVE:
        return RUNNING
    if info.state in _FAILED or info.state in ("COMPLETED", "NODE_FAIL", "GONE"):
        return FAILED  # COMPLETED without the stage's last checkpoint: it did not finish
    if info.state in ("CANCELLED", "PREEMPTED"):
        return CANCELLED
    return None  # unknown: keep what the state file says


# ---------------------------------------------------------------- the executor
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
            alive = info is not None and info.state in _WAITING | _ACTIVE - _ENDING and \
                info.reason != "DependencyNeverSatisfied"
            if alive and not replaced:
                actions.append((stage, entry.job_id))
                continue
            if alive:
                stale.append(entry.job_id)
            if info is not None and info.state in _ENDING:  # e.g. cancelled, still saving
                ending[stage.name] = entry.job_id
            replaced = True
            actions.append((stage, None))
        state.save()
        if stale:
            _run(["scancel", *stale])
        previous: Optional[str] = None
        submitted: list[str] = []  # this call's new jobs, for an error after some were submitted
        for stage, kept in actions:
            entry = state.stage(stage.name)
            if kept:
                entry.status = _status(known[kept]) or SUBMITTED
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
                entry.ended = info.end or (None if info.state in _WAITING | _ACTIVE
                                           else entry.ended)
                if info.exit_code is not None and info.state not in _WAITING | _ACTIVE:
                    entry.exit_code = info.exit_code
            if entry.status == COMPLETED:
                continue
            if finished and (info is None or info.state not in _WAITING):
                entry.status = COMPLETED
            elif info is not None:
                entry.status = _status(info) or entry.status
        # Jobs whose afterok can no longer be met (an earlier stage failed or was cancelled).
        orphans, broken = [], False
        for entry in entries:
            info = known.get(entry.job_id) if entry.job_id else None
            waiting = entry.status == SUBMITTED and info is not None and info.state in _WAITING
            if waiting and (broken or info.reason == "DependencyNeverSatisfied"):
                orphans.append(entry.job_id)
                entry.status = CANCELLED
            broken = broken or entry.status in (FAILED, CANCELLED)
        if orphans:
            _run(["scancel", *orphans])

    def cancel(self, state: RunState) -> None:
        unfinished = [e for e in state.stages if e.status not in FINAL_STATES]
        jobs = [e.job_id for e in unfinished if e.job_id]
        if jobs:
            _run(["scancel", *reversed(jobs)])  # later stages first: no dependency races
        for entry in unfinished:
            entry.status = CANCELLED
        state.save()
