"""Preemption and time-limit signals: remember them, and let all ranks agree before saving.

SLURM sends SIGTERM at the time limit (submitit's preemption signal is SIGUSR2, others use SIGUSR1).
A handler only sets a flag; the training loop all-reduces it every step so that every rank saves
the same iteration and exits together.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
EXIT_INTERRUPTED = 3  # a rank's exit code after a signal-triggered save (meant to be requeued)

#: The last of SIGNALS this process received (through a StopFlag or ``catch_early``). A launcher
#: reads it after training returns to tell a preemption warning (USR1/USR2: requeue) from a stop
#: (TERM).
last_received: int | None = None
_early: int | None = None  # received after ``catch_early`` and before the next StopFlag existed


def catch_early() -> None:
    """Record SIGNALS from now on instead of their default action (or a launcher's own handler).

    For the time before training installs its StopFlag (model build, data): a signal caught then is
    handed to the next StopFlag, so training saves and stops after its first step instead of dying.
    """
    for sig in SIGNALS:
        signal.signal(sig, _record_early)


def _record_early(signum, frame) -> None:
    global last_received, _early
    last_received = _early = signum


class StopFlag:
    def __init__(self) -> None:
        global _early
        self.received: int | None = _early
        _early = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        global last_received
        self.received = last_received = signum

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank received a signal."""
        import torch  # here, not above: a job's entry point catches signals before torch loads
        import torch.distributed as dist

        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32,
                            device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
