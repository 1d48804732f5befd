"""One writer per run directory: ``run``, ``resume`` and ``cancel`` hold ``RUN_DIR/writer.lock``.

The lock is a POSIX record lock (``fcntl.lockf``: NFS-aware, released by the kernel when its
process dies, even by SIGKILL). The file names the holder (pid, host, process start time, command),
so a refused writer can say who holds the run, and a reader can tell a live holder from a dead one
by pid *and* start time (a pid alone may since have been reused by another process).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from mlmega.config.errors import ConfigError

LOCK_NAME = "writer.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a run's writer lock."""

    pid: int
    host: str
    started: Optional[float]  # the process's start time (epoch seconds, from /proc)
    command: str

    def alive(self) -> bool:
        """The process runs (same pid and start time); assumed so for another host's process."""
        if self.host != socket.gethostname():
            return True
        return self.started is not None and process_start_time(self.pid) == self.started

    def describe(self) -> str:
        return f"`mlmega {self.command}` (pid {self.pid} on {self.host})"


class RunBusy(ConfigError):
    """Another live process holds the run's writer lock."""


def process_start_time(pid: int) -> Optional[float]:
    """When process ``pid`` started (epoch seconds, 0.01 s resolution); None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks
    return round(boot + ticks / os.sysconf("SC_CLK_TCK"), 2)


def holder(run_dir: Path) -> Optional[Holder]:
    """The live holder of the run's lock, from the lock file (None: nobody, or a dead process)."""
    try:
        found = Holder(**json.loads((Path(run_dir) / LOCK_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return found if found.alive() else None


class RunLock:
    """``with RunLock(run_dir, "resume"):`` hold the run's writer lock, or raise :class:`RunBusy`
    naming the holder (after ``wait_s`` seconds of trying)."""

    def __init__(self, run_dir: Path, command: str, wait_s: float = 0.0):
        self.path, self.command, self.wait_s = Path(run_dir) / LOCK_NAME, command, wait_s
        self.fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                os.close(fd)
                other = holder(self.path.parent)
                who = other.describe() if other else "another process"
                raise RunBusy(f"{self.path.parent}: {who} is writing this run; one writer at a "
                              f"time (wait for it to end, or `mlmega cancel` it)") from None
        me = Holder(os.getpid(), socket.gethostname(), process_start_time(os.getpid()),
                    self.command)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(me)).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # nobody holds it now
            os.close(self.fd)  # releases the lock
            self.fd = None


def stop_local_holder(run_dir: Path, wait_s: float = 300.0) -> Optional[Holder]:
    """SIGTERM the live holder of the run when it runs on this host (a local coordinator: its
    stage saves and it records the cancel), and wait until it lets go; the holder, or None."""
    other = holder(run_dir)
    if other is None or other.host != socket.gethostname():
        return None
    os.kill(other.pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while holder(run_dir) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    return other
