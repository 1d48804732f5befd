"""Session fixture: the local SLURM cluster is up and SLURM_CONF points at it (for every test here)."""

import os

import pytest

from mlmega.launch.local_cluster import ensure_local_cluster


@pytest.fixture(scope="session", autouse=True)
def local_slurm():
    """Start (or reuse) the local cluster with at least 2 fake nodes; export its client environment.

    The first start on a new machine installs the Debian packages (~20 s); later ones take ~0.5 s.
    """
    nodes = max(2, int(os.environ.get("MLMEGA_SLURM_NODES", "2")))
    env = ensure_local_cluster(nodes=nodes)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env
