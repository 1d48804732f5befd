"""Each stage's time limit: planned time (measured, else estimated) x margin, floor, cap, overrides."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mlmega.checkpoint.directory import TRACKER
from mlmega.config.errors import ConfigError
from mlmega.vcycle.plan import plan_vcycle
from mlmega.vcycle.recipe import load_recipe
from mlmega.vcycle.run import stage_dir
from mlmega.vcycle.time_limits import check_time_limits, stage_time_limit

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def gpt_base(*overrides):
    return plan_vcycle(load_recipe(CONFIGS / "gpt-base.yaml", list(overrides)))


def estimate_min(stage) -> float:
    """Model FLOPs / (GPUs x 989 TFLOP/s x MFU 0.4), in minutes."""
    return stage.flops / (stage.resources.world * 989e12 * 0.4) / 60


def test_limits_from_the_plan_with_margin_floor_and_cap():
    plan = gpt_base()
    pre, bottom, post = plan.stages
    assert [round(estimate_min(s), 1) for s in plan.stages] == [11.0, 53.5, 110.2]
    limits = [stage_time_limit(plan, s) for s in plan.stages]
    # 11.0 x 1.5 = 16.5 -> the floor, 30; 53.5 x 1.5 -> 81; 110.2 x 1.5 -> 166 (cap 1440)
    assert [t.minutes for t in limits] == [30, 81, 166]
    assert limits[2].minutes == math.ceil(estimate_min(post) * 1.5)
    assert limits[2].planned_min == pytest.approx(estimate_min(post))
    assert "planned 110.2 min (50000 steps at MFU 0.4 of 989 TFLOP/s per GPU)" in limits[2].source
    capped = gpt_base("cluster.time_limit_min=120")
    assert [stage_time_limit(capped, s).minutes for s in capped.stages] == [30, 81, 120]
    tuned = gpt_base("cluster.time_limit_margin=2", "cluster.time_limit_floor_min=10")
    assert [stage_time_limit(tuned, s).minutes for s in tuned.stages] == [23, 107, 221]


def test_a_stage_override_wins():
    plan = gpt_base("cluster.time_limits={1-bottom-L1: 600}")
    limits = [stage_time_limit(plan, s) for s in plan.stages]
    assert [t.minutes for t in limits] == [30, 600, 166]
    assert limits[1].source == "cluster.time_limits.1-bottom-L1"


def write_metrics(run_dir: Path, stage: str, seconds: list[float], saved: int = 0) -> None:
    path = stage_dir(run_dir, stage)
    path.mkdir(parents=True)
    records = [dict(step=i + 1, loss=4.0, seconds=s) for i, s in enumerate(seconds)]
    records.append(dict(step=len(seconds), val_loss=4.0))  # evaluations carry no step time
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if saved:
        (path / TRACKER).write_text(str(saved))


def test_measured_step_time_replaces_the_estimate(tmp_path):
    """Level 0 timed at a median 0.5 s/step (its first step, 9 s, is an outlier): the pre stage's
    4000 steps left take 33.3 min, the post stage (same level: same model and layout) 416.7 min;
    the bottom level is not timed yet and keeps the estimate."""
    plan = gpt_base()
    write_metrics(tmp_path, "0-pre-L0", [9.0] + [0.5] * 9 + [0.6, 0.4], saved=1000)
    pre, bottom, post = (stage_time_limit(plan, s, tmp_path) for s in plan.stages)
    assert pre.planned_min == pytest.approx(4000 * 0.5 / 60)
    assert pre.minutes == math.ceil(4000 * 0.5 / 60 * 1.5) == 50
    assert "4000 steps x 0.5 s measured" in pre.source
    assert post.planned_min == pytest.approx(50000 * 0.5 / 60) and post.minutes == 625
    assert bottom.minutes == 81 and "MFU" in bottom.source


def test_cpu_nodes_use_the_cap_until_a_step_is_timed(tmp_path):
    plan = plan_vcycle(load_recipe(CONFIGS / "tiny-gpt.yaml", ["cluster.time_limit_min=20",
                                                               "cluster.time_limit_floor_min=5"]))
    stage = plan.stages[0]
    first = stage_time_limit(plan, stage, tmp_path)
    assert (first.minutes, first.planned_min) == (20, None)
    assert "CPU nodes: no step time measured yet" in first.source
    write_metrics(tmp_path, stage.name, [2.0] * 5)
    timed = stage_time_limit(plan, stage, tmp_path)
    assert timed.planned_min == pytest.approx(stage.steps * 2.0 / 60)
    assert timed.minutes == min(20, max(5, math.ceil(stage.steps * 2.0 / 60 * 1.5)))


@pytest.mark.parametrize("override, message", [
    ("cluster.time_limits={0-pre-L1: 60}", r"cluster.time_limits.0-pre-L1: no such stage; the "
                                           r"stages are \['0-pre-L0', '1-bottom-L1', '2-post-L0'\]"),
    ("cluster.time_limits={0-pre-L0: 1.5}", r"cluster.time_limits.0-pre-L0=1.5: expected a whole"),
    ("cluster.time_limits=[60]", r"cluster.time_limits=\[60\]: expected a mapping"),
    ("cluster.time_limit_margin=0.9", r"cluster.time_limit_margin=0.9: expected a number >= 1"),
    ("cluster.time_limit_floor_min=-5", r"cluster.time_limit_floor_min=-5: expected an integer"),
])
def test_bad_time_limit_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        check_time_limits(gpt_base(override))
