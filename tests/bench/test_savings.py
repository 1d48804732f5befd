"""The savings measurement: where a curve reaches the baseline's loss, and the --quick smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.savings import Curve, compare, reach

ROOT = Path(__file__).resolve().parents[2]


def test_reach_interpolates_between_evaluations():
    curve = Curve("v", flops=[0, 10, 20, 30, 40], seconds=[0, 1, 2, 3, 4],
                  loss=[9.0, 5.0, 4.0, 3.0, 2.0], stage=["a", "a", "b", "b", "b"])
    # stage "a" reaches 5.0 never below 4.5; stage b crosses 3.5 halfway between 20 and 30
    assert reach(curve, 4.5, "a") is None
    assert reach(curve, 3.5, "b") == pytest.approx((25.0, 2.5))
    assert reach(curve, 4.0, "b") == (20, 2)  # its first point already reaches it


def test_compare_reports_savings_against_the_baseline():
    baseline = Curve("baseline", flops=[0, 50, 100], seconds=[0, 5, 10], loss=[9, 4, 3])
    vcycle = Curve("v", flops=[10, 40, 60, 80], seconds=[2, 4, 7, 9], loss=[6, 5, 3.5, 2.5],
                   stage=["pre", "post", "post", "post"])
    result = compare(baseline, vcycle, "post")
    assert result["reached"] and result["flops_to_reach"] == pytest.approx(70.0)
    assert result["flops_saving_pct"] == pytest.approx(30.0)
    assert result["wallclock_saving_pct"] == pytest.approx(20.0)
    never = compare(baseline, Curve("w", [10, 20], [1, 2], [8, 7], ["post", "post"]), "post")
    assert not never["reached"] and never["flops_saving_pct"] is None


@pytest.mark.slow
def test_quick_benchmark_writes_the_report(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "savings.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("flops_saving_pct", "wallclock_saving_pct", "baseline_final_val_loss", "curves"):
        assert key in report
    baseline = report["curves"]["baseline-gpt"]
    assert len(baseline["loss"]) >= 3 and baseline["loss"][-1] < baseline["loss"][0]
    assert (tmp_path / "savings.png").stat().st_size > 10_000
    assert "gpt-2level" in (tmp_path / "report.md").read_text()
