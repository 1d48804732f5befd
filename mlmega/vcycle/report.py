"""Curves from a run's metrics: validation loss against cumulative model FLOPs, as a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from mlmega.vcycle.run import stage_dir


def read_metrics(save_dir: Path) -> list[dict]:
    path = Path(save_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def validation_curve(records: Iterable[dict]) -> list[tuple[float, float]]:
    """(cumulative FLOPs, validation loss); a resumed stage's re-evaluations keep the last."""
    points = {}
    for r in records:
        if "val_loss" in r:
            points[r["step"]] = (r["flops"], r["val_loss"])
    return [points[s] for s in sorted(points)]


def plot_run(run_dir: Path, stage_names: list[str], out: Path, title: str = "") -> Path:
    """Validation loss vs cumulative model FLOPs, one colour per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in stage_names:
        curve = validation_curve(read_metrics(stage_dir(run_dir, name)))
        if curve:
            xs, ys = zip(*curve)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel("cumulative model FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_title(title or Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
