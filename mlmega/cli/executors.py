"""The executors a recipe or ``--executor`` can name."""

from __future__ import annotations

from mlmega.launch.executor import Executor, LocalExecutor
from mlmega.launch.slurm import SlurmExecutor

EXECUTORS = {"local": LocalExecutor, "slurm": SlurmExecutor}


def make_executor(name: str) -> Executor:
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}")
    return EXECUTORS[name]()
