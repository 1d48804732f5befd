"""What users watch: periodic progress lines with rate and ETA, and a console for tables."""

from __future__ import annotations

import shutil
import sys
import time
from typing import Callable, Optional, TextIO


class Progress:
    """Counts work done out of ``total`` and logs ``label: 42% 1.2/3.0 GB 0.8 GB/s ETA 2s``."""

    def __init__(self, label: str, total: float, unit: str = "GB", scale: float = 1e9,
                 every: float = 2.0, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.unit, self.scale = label, total, unit, scale
        self.every, self.stream, self.clock = every, stream or sys.stderr, clock
        self.done = 0.0
        self.start = self.last = clock()

    def update(self, amount: float) -> None:
        self.done += amount
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    def line(self) -> str:
        elapsed = max(self.elapsed, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.label}: {pct:5.1f}% {self.done / self.scale:.2f}/{self.total / self.scale:.2f} "
                f"{self.unit} {rate / self.scale:.2f} {self.unit}/s ETA {format_seconds(left)}")


def format_seconds(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def console():
    """A rich console wide enough for mlmega's tables, also when output goes to a file or pipe."""
    from rich.console import Console

    return Console(width=max(shutil.get_terminal_size((160, 24)).columns, 150))
