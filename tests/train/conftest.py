"""Training helpers: stage configs for a tiny model on the prepared data, and a stage runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import VOCAB


def model_section(arch: str, **changes) -> dict:
    model = dict(arch=arch, num_layers=4, hidden_size=64, num_attention_heads=4,
                 vocab_size=VOCAB, max_sequence_length=32)
    model.update(changes)
    return model


def stage_config(tmp_path: Path, name: str, data_dir: Path, arch: str = "gpt", **changes) -> Path:
    """Write a stage config for a tiny model; returns its path (save_dir = tmp_path/name)."""
    cfg = dict(model=model_section(arch), data_dir=str(data_dir), save_dir=str(tmp_path / name),
               steps=4, seq_length=32, micro_batch_size=2, global_batch_size=8,
               optimizer=dict(lr=2e-3, warmup_steps=1), eval_iters=1, seed=7)
    cfg.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_stage(config: Path, nproc: int = 1, expect: int = 0) -> subprocess.CompletedProcess:
    """``mlmega train CONFIG --nproc N`` in a subprocess; asserts the exit code."""
    proc = subprocess.run([sys.executable, "-m", "mlmega", "train", str(config), "--nproc",
                           str(nproc)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(save_dir: Path) -> dict[int, float]:
    """step -> training loss from a stage's metrics.jsonl (the last record of a step wins)."""
    out = {}
    for line in (save_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def assert_losses_match(runs: dict[str, dict[int, float]], reference: str,
                        rel: float = 1e-4) -> None:
    """Every run's per-step losses equal run ``reference``'s within ``rel`` (4 steps, going down)."""
    expected = runs[reference]
    assert sorted(expected) == [1, 2, 3, 4]
    assert expected[4] < expected[1], "the loss must go down"
    for name, got in runs.items():
        for step, loss in expected.items():
            assert got[step] == pytest.approx(loss, rel=rel), f"{name} step {step}"
