"""Curves from a run's metrics: validation loss against cumulative model FLOPs, as a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from mlmega.config.errors import ConfigError
from mlmega.vcycle.run import RunState, stage_dir

Curve = list[tuple[float, float]]
METRICS_FILE = "metrics.jsonl"  # in each stage's save directory (TrainConfig.metrics_path)


def read_metrics(path: Path) -> list[dict]:
    """A stage's metric records (``path``: its save directory or its metrics file); a last line
    cut short (its writer stopped mid-line) is skipped."""
    path = Path(path)
    file = path if path.is_file() else path / METRICS_FILE
    if not file.exists():
        return []
    lines = file.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines) and line.strip():
                raise ConfigError(f"{file}:{number}: not a JSON record: {line[:80]!r}") from None
    return records


def validation_curve(records: Iterable[dict]) -> Curve:
    """(cumulative FLOPs, validation loss); a resumed stage's re-evaluations keep the last."""
    points = {}
    for r in records:
        if "val_loss" in r:
            points[r["step"]] = (r["flops"], r["val_loss"])
    return [points[s] for s in sorted(points)]


def run_curve(path: Path) -> Curve:
    """The validation curve of a run directory (its stages in order), of one stage's save
    directory, or of a metrics file; ConfigError when ``path`` is none of these."""
    path = Path(path)
    if (path / "state.json").is_file():
        return [point for entry in RunState.load(path).stages
                for point in validation_curve(read_metrics(stage_dir(path, entry.name)))]
    if path.is_file() or (path / METRICS_FILE).is_file():
        return validation_curve(read_metrics(path))
    raise ConfigError(f"baseline={path}: expected a run directory, a stage directory holding "
                      f"{METRICS_FILE}, or a metrics file")


def plot_run(run_dir: Path, stage_names: list[str], out: Path, title: str = "",
             baseline: Optional[Curve] = None) -> Path:
    """Validation loss vs cumulative model FLOPs, one colour per stage, and the baseline's curve
    (when given) in black; an empty run gives an empty plot saying so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in stage_names:
        curve = validation_curve(read_metrics(stage_dir(run_dir, name)))
        if curve:
            xs, ys = zip(*curve)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    if baseline:
        xs, ys = zip(*baseline)
        ax.plot(xs, ys, color="black", lw=1.2, label="baseline")
    ax.set_xlabel("cumulative model FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_title(title or Path(run_dir).name)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no validation loss yet", ha="center", va="center",
                transform=ax.transAxes, color="grey")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
