"""What ``mlmega status`` and ``run --help`` show a user: wall time over every attempt, metrics
with a half-written last line, the baseline's curve in the loss plot, empty plots without warnings.
No training runs here: the run directories are written as the executors and trainers write them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from mlmega.cli.main import main
from mlmega.config.errors import ConfigError
from mlmega.vcycle.plan import plan_vcycle
from mlmega.vcycle.recipe import load_recipe
from mlmega.vcycle.report import plot_run, read_metrics, run_curve
from mlmega.vcycle.run import COMPLETED, RunState, create_run, stage_dir

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def new_run(tmp_path: Path, *overrides: str) -> tuple[Path, list[str]]:
    plan = plan_vcycle(load_recipe(CONFIGS / "tiny-gpt.yaml", list(overrides)))
    run_dir = tmp_path / "run"
    create_run(plan, run_dir, tmp_path / "data", "local")
    return run_dir, [s.name for s in plan.stages]


def write_metrics(save_dir: Path, records: list[dict], tail: str = "") -> None:
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_status_sums_the_wall_time_of_every_attempt_and_skips_a_cut_line(tmp_path, capsys):
    run_dir, names = new_run(tmp_path)
    state = RunState.load(run_dir)
    first = state.stages[0]
    # two local attempts (a resume), then a SLURM job that ran twice (requeued): 2h01m07s
    first.status, first.attempts, first.job_id = COMPLETED, 3, "17"
    first.wall = {"local:100": 3600.0, "local:200": 7.0, "17": 3660.0}
    state.save()
    write_metrics(stage_dir(run_dir, names[0]),
                  [{"step": 1, "loss": 7.5, "flops": 1.0}, {"step": 2, "loss": 7.25, "flops": 2.0},
                   {"step": 2, "val_loss": 7.4, "flops": 2.0}],
                  tail='{"step": 3, "loss": 7.1, "fl')  # the trainer was killed mid-line
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if names[0] in line)
    assert "2h01m" in row and "7.2500" in row and "7.4000" in row and "2/40" in row, row
    assert RunState.load(run_dir).stages[0].wall_s == pytest.approx(7267.0)
    assert (run_dir / "loss.png").stat().st_size > 5_000


def test_a_cut_line_inside_the_metrics_is_an_error_naming_it(tmp_path):
    write_metrics(tmp_path, [{"step": 1, "loss": 7.5}], tail='{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ConfigError, match=r"metrics\.jsonl:2: not a JSON record"):
        read_metrics(tmp_path)


def test_the_trainer_drops_a_cut_line_before_appending(tmp_path):
    from mlmega.train.metrics import MetricsLog

    write_metrics(tmp_path, [{"step": 1, "loss": 7.5}], tail='{"step": 2, "lo')
    MetricsLog(tmp_path / "metrics.jsonl", enabled=True).write(step=2, loss=7.0)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_the_loss_plot_shows_the_baseline_the_recipe_names(tmp_path, capsys):
    baseline_dir, baseline_stages = new_run(tmp_path / "baseline")
    for i, name in enumerate(baseline_stages):  # a run: its stages' curves, one after another
        write_metrics(stage_dir(baseline_dir, name),
                      [{"step": s, "val_loss": 8.0 - i - s / 10, "flops": 10.0 * i + s}
                       for s in (1, 2)])
    assert run_curve(baseline_dir) == [(1.0, 7.9), (2.0, 7.8), (11.0, 6.9), (12.0, 6.8),
                                       (21.0, 5.9), (22.0, 5.8)]
    metrics = stage_dir(baseline_dir, baseline_stages[0]) / "metrics.jsonl"
    assert run_curve(metrics) == run_curve(metrics.parent) == [(1.0, 7.9), (2.0, 7.8)]
    with pytest.raises(ConfigError, match=r"baseline=.*nowhere: expected a run directory"):
        run_curve(tmp_path / "nowhere")

    run_dir, names = new_run(tmp_path, f"baseline={baseline_dir}")
    write_metrics(stage_dir(run_dir, names[0]), [{"step": 4, "val_loss": 7.0, "flops": 4.0}])
    assert main(["status", str(run_dir)]) == 0
    with_baseline = (run_dir / "loss.png").read_bytes()
    assert main(["status", str(run_dir), "--baseline", str(metrics)]) == 0
    assert (run_dir / "loss.png").read_bytes() != with_baseline  # another baseline, another plot
    plot_run(run_dir, names, tmp_path / "alone.png")
    assert (tmp_path / "alone.png").read_bytes() != with_baseline
    # a recipe naming a baseline that is not there is refused before the run directory exists
    assert main(["run", str(CONFIGS / "tiny-gpt.yaml"), "--set", f"baseline={tmp_path}/nowhere",
                 "--run-dir", str(tmp_path / "refused")]) == 2
    assert "expected a run directory" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_an_empty_run_plots_without_warnings(tmp_path):
    run_dir, names = new_run(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_run(run_dir, names, run_dir / "loss.png")
    assert (run_dir / "loss.png").stat().st_size > 5_000


def test_run_help_documents_the_recipe_and_set(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "RECIPE a V-cycle recipe (YAML): the model, its levels" in text
    assert "--set KEY=VALUE override one recipe value, KEY a dotted path into the recipe and " \
           "VALUE parsed as YAML (repeatable)" in text
