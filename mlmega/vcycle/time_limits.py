"""Each stage's job time limit: its planned time x a margin, with a floor, under a cap.

Planned time: the steps the stage has left x its step time, measured where this run has timed
steps of the stage's level (same model, same layout: the median of ``metrics.jsonl``'s ``seconds``),
else estimated on GPU nodes from its FLOPs at ``sizing.mfu`` of ``sizing.gpu_peak_tflops`` per GPU.
The limit is that x ``cluster.time_limit_margin``, at least ``cluster.time_limit_floor_min``, at
most ``cluster.time_limit_min`` (a stage that needs longer saves and requeues itself before its
limit, so requeues cover the rest). CPU nodes with nothing measured get ``time_limit_min``.
``cluster.time_limits: {STAGE: minutes}`` overrides a stage's limit.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mlmega.config.errors import ConfigError
from mlmega.vcycle.plan import Plan, Stage
from mlmega.vcycle.report import read_metrics
from mlmega.vcycle.run import saved_step, stage_dir


@dataclass(frozen=True)
class TimeLimit:
    """A stage's --time, and how it was reached (for --dry-run and errors)."""

    minutes: int
    source: str
    planned_min: Optional[float] = None  # the stage's planned time (None: nothing to plan from)


def measured_step_seconds(plan: Plan, stage: Stage, run_dir: Path) -> Optional[float]:
    """The median step time this run measured at the stage's level (None: not timed yet)."""
    seconds = [r["seconds"] for s in plan.stages if s.level == stage.level
               for r in read_metrics(stage_dir(run_dir, s.name)) if "seconds" in r]
    return statistics.median(seconds) if seconds else None


def planned_minutes(plan: Plan, stage: Stage,
                    run_dir: Optional[Path] = None) -> tuple[Optional[float], str]:
    """The time ``stage`` still needs, and how it was found (None: CPU nodes, nothing measured)."""
    sizing = plan.recipe.sizing
    left = stage.steps - (saved_step(run_dir, stage.name) if run_dir else 0)
    step_s = measured_step_seconds(plan, stage, run_dir) if run_dir else None
    if step_s is not None:
        return left * step_s / 60, f"{left} steps x {step_s:.3g} s measured"
    if not stage.resources.gpus_per_node:
        return None, "CPU nodes: no step time measured yet"
    gpu_h = stage.gpu_hours(sizing.gpu_peak_tflops, sizing.mfu) * left / stage.steps
    return gpu_h * 60 / stage.resources.world, (f"{left} steps at MFU {sizing.mfu:g} of "
                                                 f"{sizing.gpu_peak_tflops:g} TFLOP/s per GPU")


def stage_time_limit(plan: Plan, stage: Stage, run_dir: Optional[Path] = None) -> TimeLimit:
    """The --time of ``stage``'s job (see the module docstring)."""
    cluster = plan.recipe.cluster
    planned, how = planned_minutes(plan, stage, run_dir)
    if stage.name in cluster.time_limits:
        return TimeLimit(cluster.time_limits[stage.name], f"cluster.time_limits.{stage.name}",
                         planned)
    if planned is None:
        return TimeLimit(cluster.time_limit_min, f"cluster.time_limit_min ({how})")
    sized = max(cluster.time_limit_floor_min, math.ceil(planned * cluster.time_limit_margin))
    return TimeLimit(min(cluster.time_limit_min, sized),
                     f"planned {planned:.1f} min ({how}) x margin {cluster.time_limit_margin:g}, "
                     f"floor {cluster.time_limit_floor_min}, cap cluster.time_limit_min="
                     f"{cluster.time_limit_min}", planned)


def check_time_limits(plan: Plan) -> None:
    """ConfigError naming the key when a time-limit setting is out of range or names no stage."""
    cluster, source = plan.recipe.cluster, plan.recipe.source  # (scalars: the recipe's table)
    names = [s.name for s in plan.stages]
    for name, minutes in cluster.time_limits.items():
        if name not in names:
            raise ConfigError(f"{source}: cluster.time_limits.{name}: no such stage; the stages "
                              f"are {names}")
        _whole_minutes(f"{source}: cluster.time_limits.{name}", minutes)


def _whole_minutes(where: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}={value!r}: expected a whole number of minutes >= 1")
