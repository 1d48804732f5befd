"""A stage's sbatch script: submitit parameters from the plan, their checks, and the rendering.

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
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from mlmega import compat
from mlmega.config.errors import ConfigError
from mlmega.launch.slurm_job import DEFAULT_MAX_REQUEUES, MAX_REQUEUES_ENV
from mlmega.launch.slurm_queue import partitions
from mlmega.vcycle.plan import Plan, Stage
from mlmega.vcycle.time_limits import TimeLimit, check_time_limits, stage_time_limit

SIGNAL_DELAY_S = 90  # USR2 this long before the time limit (submitit's default)
STARTUP_S = 120  # a job's time limit leaves at least this long before its USR2 warning

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


def submitit_folder(run_dir: Path, stage: Stage) -> Path:
    """Where submitit keeps a stage's scripts, pickles and logs (``%j``: one folder per job)."""
    return Path(run_dir).absolute() / "submitit" / stage.name / "%j"


def python_executable(python: Optional[str] = None) -> str:
    """``python`` (default: this interpreter), shell-quoted: what the job runs."""
    return shlex.quote(python or sys.executable)


def _command(folder: Path, python: str) -> str:
    """What every task runs under srun: :mod:`mlmega.launch.job_main` (``python`` quoted)."""
    return " ".join([python, "-u -m mlmega.launch.job_main", shlex.quote(str(folder))])


# submitit's SLURM executor, starting each task through mlmega.launch.job_main
StageExecutor = compat.slurm_executor_running(_command)


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
    known = partitions()
    if known is None:
        return
    for name in cluster.partition.split(","):
        if name not in known:
            raise ConfigError(f"{plan.recipe.source}: cluster.partition={name!r}: no such "
                              f"partition on this cluster; sinfo lists {known}")


def render(plan: Plan, stage: Stage, run_dir: Path, dependency: Optional[str] = None) -> str:
    """The sbatch script submitit submits for ``stage`` (the same function renders both)."""
    folder = submitit_folder(run_dir, stage)
    return compat.make_sbatch_string(command=_command(folder, python_executable(
        plan.recipe.cluster.python)), folder=folder,
        **sbatch_parameters(plan, stage, run_dir, dependency))
