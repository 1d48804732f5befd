"""Bring up the local SLURM test cluster (``slurm/local-cluster.sh``) from Python.

The cluster is a real SLURM (munged, slurmdbd, slurmctld and one ``slurmd`` per fake node) running on
this machine; see ``slurm/README.md``. Typical use (tests, demos)::

    os.environ.update(ensure_local_cluster(nodes=2))
    executor = submitit.AutoExecutor(folder=..., cluster="slurm")

Needs a source checkout (the script is not part of the installed package) and root.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from pathlib import Path

#: ``slurm/local-cluster.sh`` in the repository that holds this package (``<repo>/mlmega/launch/``).
SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "local-cluster.sh"


def ensure_local_cluster(nodes: int = 2) -> dict[str, str]:
    """Start the local cluster with ``nodes`` fake nodes unless it already runs; return its client env.

    Runs ``slurm/local-cluster.sh start`` (idempotent: quick when the cluster is up; installs the
    Debian packages and starts the daemons otherwise; restarts slurmctld/slurmd, keeping jobs, when
    the node count differs from the running cluster's). The other ``MLMEGA_SLURM_*`` knobs are taken
    from the environment. Returns ``{"SLURM_CONF": ...}``, the variables SLURM clients (sbatch,
    sacct, submitit) need. Raises ``RuntimeError`` with the script's output when it fails.
    """
    if not SCRIPT.is_file():
        raise FileNotFoundError(f"{SCRIPT} not found: ensure_local_cluster needs a source checkout")
    env = {**os.environ, "MLMEGA_SLURM_NODES": str(nodes)}
    # Output goes to a file, not a pipe: a daemon that kept a pipe open would make us wait forever.
    with tempfile.TemporaryFile(mode="w+") as log:
        done = subprocess.run(["bash", str(SCRIPT), "start"], env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{SCRIPT} start failed (exit {done.returncode}):\n{log.read()}")
    printed = subprocess.run(["bash", str(SCRIPT), "env"], env=env, check=True, capture_output=True, text=True)
    result: dict[str, str] = {}
    for line in printed.stdout.splitlines():  # lines like: export SLURM_CONF=/tmp/mlmega-slurm/etc/slurm.conf
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            result[key] = value
    return result
