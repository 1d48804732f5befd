"""Per-step metrics as JSON lines (rank 0) and a progress line with rate and ETA."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlmega.progress import format_seconds


class MetricsLog:
    """Appends one JSON object per line; safe to reopen after a resume (a line left half-written
    by a killed writer is dropped, so the next record starts on a line of its own)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                data = path.read_bytes()
                if data and not data.endswith(b"\n"):
                    with path.open("r+b") as fh:
                        fh.truncate(data.rfind(b"\n") + 1)

    def write(self, **record) -> None:
        """Append ``record`` with the wall-clock time it was written (unix seconds)."""
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps({**record, "time": time.time()}) + "\n")


class StepTimer:
    """Rates and ETA over the steps of this process (a resumed run restarts the clock)."""

    def __init__(self, start_step: int, total_steps: int):
        self.start_step, self.total = start_step, total_steps
        self.start = self.last = time.monotonic()

    def lap(self) -> float:
        now = time.monotonic()
        seconds, self.last = now - self.last, now
        return seconds

    def eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        per_step = (time.monotonic() - self.start) / done
        return format_seconds(per_step * (self.total - step))
