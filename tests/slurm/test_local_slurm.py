"""Real jobs on the local SLURM cluster through submitit: a result, a 2-node gloo all_reduce, afterok.

Each test uses its own submitit folder (tmp_path): job ids restart at 1 when the cluster state is
wiped, so a reused folder could hand back an older job's result.
"""

import datetime as dt
import os
import subprocess
import sys
import time

import cloudpickle
import pytest
import submitit

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# The job functions below are pickled by value: the job need not be able to import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _executor(folder, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition="debug", **params)
    return executor


def _scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o ID` as a dict (JobState, Reason, Dependency, ...)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], check=True, capture_output=True, text=True)
    return dict(word.split("=", 1) for word in out.stdout.split() if "=" in word)


def _sacct(job_ids: list[str], timeout_s: float = 15.0) -> dict[str, dict[str, str]]:
    """sacct rows (allocation lines only) once every job is recorded as finished."""
    fields = ["JobID", "State", "Start", "End", "NodeList"]
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", ",".join(fields)],
            check=True, capture_output=True, text=True,
        ).stdout
        rows = {r["JobID"]: r for r in (dict(zip(fields, line.split("|"))) for line in out.splitlines())}
        if all(rows.get(j, {}).get("State") in {"COMPLETED", "FAILED", "CANCELLED"} for j in job_ids):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"sacct did not record {job_ids} as finished:\n{out}")
        time.sleep(0.5)


# ---------------------------------------------------------------- job functions (run on the cluster)
def _add(a: int, b: int) -> dict:
    return {"sum": a + b, "node": os.environ.get("SLURMD_NODENAME"), "python": sys.executable}


def _gloo_all_reduce() -> dict:
    import torch
    import torch.distributed as dist
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    # Fake node names (n1, n2) do not resolve; on a real cluster master_addr stays the first node.
    env.master_addr = "127.0.0.1"
    env.export(set_cuda_visible_devices=False)
    dist.init_process_group("gloo", timeout=dt.timedelta(seconds=60))
    try:
        value = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(value)
    finally:
        dist.destroy_process_group()
    return {"rank": env.rank, "world_size": env.world_size, "sum": value.item(),
            "node": os.environ["SLURMD_NODENAME"]}


def _timed_sleep(seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


# ---------------------------------------------------------------- tests
def test_submit_and_result(tmp_path):
    job = _executor(tmp_path, slurm_job_name="mlmega-add").submit(_add, 2, 3)
    result = job.result()
    assert result["sum"] == 5
    assert result["node"] in {"n1", "n2"}
    assert result["python"] == sys.executable  # the job ran this venv's Python
    # submitit reads the state through sacct (accounting is on); job.state is cached, so force a poll
    deadline = time.monotonic() + 15
    while (state := job.get_info(mode="force").get("State")) != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert state == "COMPLETED"


def test_two_node_gloo_all_reduce(tmp_path):
    executor = _executor(tmp_path, slurm_job_name="mlmega-gloo", nodes=2, tasks_per_node=1, cpus_per_task=1)
    job = executor.submit(_gloo_all_reduce)
    results = sorted(job.results(), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 for r in results)
    assert all(r["sum"] == 3.0 for r in results)  # 1 + 2
    assert {r["node"] for r in results} == {"n1", "n2"}  # one task on each fake node


def test_afterok_dependency(tmp_path):
    executor = _executor(tmp_path, slurm_job_name="mlmega-first")
    first = executor.submit(_timed_sleep, 3.0)
    executor.update_parameters(
        slurm_job_name="mlmega-second", slurm_additional_parameters={"dependency": f"afterok:{first.job_id}"}
    )
    second = executor.submit(_timed_sleep, 0.0)

    held = _scontrol_job(second.job_id)
    assert held["Dependency"].startswith(f"afterok:{first.job_id}"), held["Dependency"]
    assert held["JobState"] == "PENDING" and held["Reason"] == "Dependency", (held["JobState"], held["Reason"])

    _, first_end = first.result()
    second_start, _ = second.result()
    assert second_start >= first_end

    rows = _sacct([first.job_id, second.job_id])
    assert rows[first.job_id]["State"] == rows[second.job_id]["State"] == "COMPLETED"
    # sacct's times have 1 s resolution: the second job started no earlier than the first ended
    assert rows[second.job_id]["Start"] >= rows[first.job_id]["End"], rows
