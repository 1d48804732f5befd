"""Child processes that do not outlive their parent: local ranks and conversion workers."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Run in the child (``preexec_fn``, pool initializer): the kernel SIGKILLs it when ``parent``
    dies, even by SIGKILL, which runs no cleanup (``PR_SET_PDEATHSIG``, Linux); it exits at once
    if ``parent`` died before that took effect. The kernel watches the thread that started the
    child: start it from a thread that outlives it (run_ranks_locally waits for its ranks)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
