"""Preemption and time-limit signals: remember them, and let all ranks agree before saving.

SLURM sends SIGTERM at the time limit (submitit's preemption signal is SIGUSR2, others use SIGUSR1).
A handler only sets a flag; the training loop all-reduces it every step so that every rank saves
the same iteration and exits together.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopFlag:
    def __init__(self) -> None:
        self.received: int | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank received a signal."""
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32,
                            device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
