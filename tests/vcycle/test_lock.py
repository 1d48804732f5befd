"""One writer per run directory: the lock refuses a second process, names its holder, and tells a
live holder from a dead one (or a reused pid) by pid and process start time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from mlmega.vcycle.lock import LOCK_NAME, Holder, RunLock, holder, process_start_time

TRY_LOCK = """
import sys
from mlmega.vcycle.lock import RunBusy, RunLock
try:
    with RunLock(sys.argv[1], "resume"):
        print("acquired")
except RunBusy as err:
    print(err)
    sys.exit(2)
"""


def try_lock(run_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(run_dir)], capture_output=True,
                          text=True, timeout=60)


def test_a_second_writer_is_refused_with_the_holders_pid_and_host(tmp_path):
    with RunLock(tmp_path, "run"):
        other = try_lock(tmp_path)
        assert other.returncode == 2, other.stdout + other.stderr
        assert f"`mlmega run` (pid {os.getpid()} on {socket.gethostname()})" in other.stdout
        assert holder(tmp_path).pid == os.getpid()
    assert holder(tmp_path) is None, "released: nobody holds it"
    assert try_lock(tmp_path).stdout.strip() == "acquired"


def test_a_dead_holder_releases_the_lock_and_is_not_taken_for_alive(tmp_path):
    # a process that takes the lock and is killed by SIGKILL: the kernel releases its lock, and
    # the file still naming it does not make it look alive
    code = (f"import os, signal; from mlmega.vcycle.lock import RunLock\n"
            f"RunLock({str(tmp_path)!r}, 'run').__enter__(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -9
    recorded = json.loads((tmp_path / LOCK_NAME).read_text())
    assert recorded["command"] == "run" and recorded["pid"] != os.getpid()
    assert holder(tmp_path) is None
    with RunLock(tmp_path, "resume"):
        assert holder(tmp_path).command == "resume"


def test_a_reused_pid_is_not_the_holder(tmp_path):
    me = process_start_time(os.getpid())
    assert me is not None and process_start_time(2 ** 22 + 7) is None
    host = socket.gethostname()
    assert Holder(os.getpid(), host, me, "run").alive()
    # the same pid, but a process that started at another time: not the one that held the run
    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(pid=os.getpid(), host=host,
                                                      started=me - 60.0, command="run")))
    assert holder(tmp_path) is None
