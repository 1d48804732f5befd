"""Run an ``mlmega`` command as N local ranks (one process each), as srun would on a node."""

from __future__ import annotations

import codecs
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Optional, Sequence, TextIO

from mlmega.parallel.parent_death import die_with_parent
from mlmega.parallel.setup import free_port
from mlmega.train.signals import EXIT_INTERRUPTED

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_live: set[subprocess.Popen] = set()  # every rank of this process's running run_ranks_locally
_live_lock = threading.RLock()  # RLock: the handler may interrupt the main thread holding it
_stopping = threading.Event()  # a signal came inside forwarding_signals: start no more ranks
_depth = 0  # how many forwarding_signals the main thread is inside


def _forward(signum, frame) -> None:  # cancel/preempt: every rank saves and exits (code 3)
    _stopping.set()
    with _live_lock:
        ranks = list(_live)
    for proc in ranks:
        if proc.poll() is None:
            proc.send_signal(signum)


@contextmanager
def forwarding_signals():
    """While inside, SIGTERM/SIGUSR1/SIGUSR2 sent to this process go on to the ranks of every
    :func:`run_ranks_locally` running here, in any thread, and from then on until the outermost
    one exits, :func:`run_ranks_locally` starts no ranks (a stop holds for the runs about to
    start too, as for those in flight). Python handles signals in the main thread only: entered
    in another thread, it relies on the main thread having entered it."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _forward) for sig in FORWARDED}
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _stopping.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_ranks_locally(argv: Sequence[str], nprocs: int, env: Optional[dict] = None,
                      log_dir: Optional[Path] = None, job: str = "local") -> int:
    """Start ``python -m mlmega ARGV`` on ``nprocs`` ranks. With ``log_dir``, every rank writes
    ``log_dir/JOB_RANK_log.out`` and ``.err`` (srun's ``%j_%t_log.out`` names) and rank 0's are
    echoed here too; without, rank 0 prints here and the others nowhere. If a rank fails, the rest
    are stopped; returns the exit code of the rank that failed first (or 0). A rank other than 0
    that failed first has its stderr shown here (or its log's path): stopping rank 0 may have cut
    its message off. SIGTERM/SIGUSR1/SIGUSR2 sent to this process are passed on to every rank
    (which save a checkpoint and exit; from another thread than the main one: within the main
    thread's :func:`forwarding_signals`). If this process dies (even by SIGKILL), the kernel kills
    the ranks (Linux), so no trainer outlives its coordinator. After such a signal (within
    :func:`forwarding_signals`) it starts nothing and returns the code of a rank that saved and
    stopped."""
    if _stopping.is_set():
        return EXIT_INTERRUPTED
    port = free_port()
    procs, echoes, captured = [], [], {}  # captured: rank -> its stderr (ranks > 0, no log_dir)
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    for rank in range(nprocs):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(nprocs),
                    "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                    "PYTHONUNBUFFERED": "1"}  # the logs keep up with the ranks (as srun -u)
        out = err = None if rank == 0 else subprocess.DEVNULL
        if rank and log_dir is None:
            err = captured[rank] = tempfile.TemporaryFile()
        opened = []
        if log_dir is not None:
            paths = [Path(log_dir) / f"{job}_{rank}_log.{ext}" for ext in ("out", "err")]
            out, err = opened = [open(path, "ab") for path in paths]
            if rank == 0:
                echoes += [_Echo(paths[0], sys.stdout), _Echo(paths[1], sys.stderr)]
        procs.append(subprocess.Popen([sys.executable, "-m", "mlmega", *argv], env=rank_env,
                                      stdout=out, stderr=err,
                                      preexec_fn=partial(die_with_parent, os.getpid())))
        for handle in opened:
            handle.close()  # the rank holds its own copy
    codes: dict[int, int] = {}  # in the order the ranks ended
    with _live_lock:
        _live.update(procs)
    try:
        with forwarding_signals():
            while len(codes) < nprocs:
                for rank, proc in enumerate(procs):
                    if rank not in codes and proc.poll() is not None:
                        codes[rank] = proc.returncode
                        if proc.returncode != 0:
                            _stop(procs)
                for echo in echoes:
                    echo.pump()
                time.sleep(0.1)
        first = next((rank for rank, code in codes.items() if code != 0), None)  # failed first
        if first and codes[first] != EXIT_INTERRUPTED:
            _show_failure(first, codes[first], captured.get(first),
                          log_dir and Path(log_dir) / f"{job}_{first}_log.err")
    except BaseException:
        _stop(procs)
        raise
    finally:
        with _live_lock:
            _live.difference_update(procs)
        for echo in echoes:
            echo.close()
        for handle in captured.values():
            handle.close()
    return 0 if first is None else codes[first]


def _show_failure(rank: int, code: int, captured, log: Optional[Path]) -> None:
    """Say which rank other than 0 failed first, with its stderr (or where its log is)."""
    if captured is None:
        print(f"rank {rank} failed first (exit code {code}); its stderr: {log}", file=sys.stderr)
        return
    captured.seek(0)
    text = captured.read().decode("utf-8", "replace")
    print(f"rank {rank} failed first (exit code {code}); its stderr:\n{text}", end="",
          file=sys.stderr)


class _Echo:
    """Copies what a rank appends to its log file onto one of this process's streams."""

    def __init__(self, path: Path, stream: TextIO):
        self.file, self.stream = open(path, "rb"), stream
        self.file.seek(0, os.SEEK_END)  # an earlier attempt's lines were shown then
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def pump(self) -> None:
        text = self.decoder.decode(self.file.read())
        if text:
            self.stream.write(text)
            self.stream.flush()

    def close(self) -> None:
        self.pump()
        self.file.close()


def _stop(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
