"""The SLURM executor without a cluster: dry-run sbatch scripts (golden files), hostile recipe
values rendered inert or refused, the script submitit would submit, status from (faked) sacct
output, and launch/resume decisions (faked sbatch/squeue).

Regenerate the golden files after an intended change with ``MLMEGA_UPDATE_GOLDEN=1 pytest
tests/launch`` (and review the diff).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from mlmega.config.errors import ConfigError
from mlmega.launch import sbatch, slurm_queue
from mlmega.launch.slurm import SlurmExecutor
from mlmega.vcycle.plan import plan_vcycle
from mlmega.vcycle.recipe import load_recipe
from mlmega.vcycle.run import CANCELLED, COMPLETED, FAILED, RUNNING, SUBMITTED, RunState, StageState

GOLDEN = Path(__file__).parent / "golden"
HOSTILE_ENV = "$(touch /tmp/pwned)`x`"
HOSTILE_SETUP = """echo "it's \\"quoted\\"" 'and $(not) `run`'"""


def recipe_dict(**cluster) -> dict:
    """A 2-level tiny GPT (3 stages: pre L0, bottom L1, post L0) at TP=2 on 2 one-task nodes."""
    return dict(
        name="tiny-slurm",
        model=dict(arch="gpt", num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=512,
                   max_sequence_length=32),
        levels=[dict(width=dict(kind="stacked", factor=2), depth=dict(kind="adjacent", factor=2))],
        schedule=dict(coalesce_steps=[4], bottom_steps=4, decoalesce_steps=[4],
                      lr=[2e-3, 4e-3]),
        training=dict(seq_length=32, micro_batch_size=2, global_batch_size=8),
        data=dict(dir="data/gpt", prepare=False),
        cluster=dict(dict(executor="slurm", partition="debug", max_nodes=2, time_limit_min=10),
                     **cluster),
        sizing=dict(tp=2),
    )


def make_plan(tmp_path: Path, data: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return plan_vcycle(load_recipe(path))


def normalized(text: str, run_dir: Path) -> str:
    return text.replace(shlex.quote(sys.executable), "PYTHON").replace(str(run_dir), "RUN_DIR")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MLMEGA_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with MLMEGA_UPDATE_GOLDEN=1 to record it"
    assert text == path.read_text(), f"dry-run script differs from {path}"


HOSTILE = dict(partition="gpu; rm -rf /", account="acct'; echo x", qos="normal", constraint="a100",
               mem_gb=16, gpus_per_node=8, tasks_per_node=2, cpus_per_task=4,
               extra_sbatch=["--exclusive", "--comment=$(reboot) `id` \"x\""],
               env={"EVIL": HOSTILE_ENV, "NCCL_DEBUG": "WARN", "MLMEGA_MAX_REQUEUES": 2},
               setup=[HOSTILE_SETUP, "module load cuda/12.4"],
               python="/shared/envs/my env/bin/python", wckey="proj'; id")


# ---------------------------------------------------------------- golden dry-run scripts
def test_dry_run_cpu_chain_matches_golden(tmp_path):
    run_dir = tmp_path / "run"
    text = SlurmExecutor().describe(make_plan(tmp_path, recipe_dict()), run_dir)
    check_golden("tiny-cpu-tp2.sbatch", normalized(text, run_dir))
    # the chain: the first job has no dependency, each later one waits for the one before
    assert text.count("#SBATCH --dependency=") == 2
    assert "#SBATCH --dependency='afterok:<job id of 0-pre-L0>'" in text
    assert "#SBATCH --dependency='afterok:<job id of 1-bottom-L1>'" in text
    assert text.count("#SBATCH --requeue") == 3 and text.count("#SBATCH --nodes=2") == 3
    assert "#SBATCH --gpus-per-node" not in text  # a CPU cluster
    assert "#SBATCH --wckey" not in text  # none unless cluster.wckey sets one
    assert text.count("-u -m mlmega.launch.job_main") == 3  # USR2 caught before any import


def test_dry_run_of_hostile_gpu_profile_is_inert_and_matches_golden(tmp_path):
    run_dir = tmp_path / "run"
    plan = make_plan(tmp_path, recipe_dict(**HOSTILE))
    text = SlurmExecutor().describe(plan, run_dir)
    check_golden("hostile-gpu-tp2.sbatch", normalized(text, run_dir))
    assert "#SBATCH --partition='gpu; rm -rf /'" in text
    assert "#SBATCH --wckey='proj'\"'\"'; id'" in text
    assert "--kill-on-bad-exit=1 '/shared/envs/my env/bin/python' -u -m mlmega.launch.job_main " \
        in text  # cluster.python, quoted
    assert "export EVIL='$(touch /tmp/pwned)`x`'" in text
    assert "#SBATCH --gpus-per-node=2" in text  # one GPU per rank, visible to the node's ranks
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in text  # TP > 1 on GPUs
    # sbatch reads every directive as one option with one value (what shlex sees, sbatch sees)
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            words = shlex.split(line)
            assert len(words) == 2 and words[1].startswith("--"), line


def test_rendered_script_runs_inert(tmp_path):
    """Run stage 0's script with bash (a stub srun): no injected command runs, values arrive
    literally, the setup line runs as written."""
    pwned = tmp_path / "pwned"
    cluster = dict(HOSTILE, env={"EVIL": f"$(touch {pwned})`touch {pwned}`;touch {pwned}"})
    plan = make_plan(tmp_path, recipe_dict(**cluster))
    script = tmp_path / "job.sh"
    script.write_text(sbatch.render(plan, plan.stages[0], tmp_path / "run"))
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text('#!/bin/sh\nprintf "EVIL=%s\\n" "$EVIL"\n'
                               'printf "OMP=%s SRUN=%s\\n" "$OMP_NUM_THREADS" '
                               '"$SRUN_CPUS_PER_TASK"\n')
    (stub / "srun").chmod(0o755)
    (stub / "module").write_text("#!/bin/sh\necho module \"$@\"\n")
    (stub / "module").chmod(0o755)
    env = dict(os.environ, PATH=f"{stub}:{os.environ['PATH']}", SLURM_CPUS_PER_TASK="4")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=30)
    assert out.returncode == 0, out.stderr
    assert not pwned.exists()
    assert out.stdout.splitlines() == [
        """it's "quoted" and $(not) `run`""",
        "module load cuda/12.4",
        f"EVIL=$(touch {pwned})`touch {pwned}`;touch {pwned}",
        "OMP=4 SRUN=4"]


def test_script_is_what_submitit_submits(tmp_path, monkeypatch):
    """describe/render and launch go through the same submitit function with the same parameters."""
    import shutil

    import submitit

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/srun" if name == "srun"
                        else real_which(name, *a, **k))
    plan = make_plan(tmp_path, recipe_dict(**HOSTILE))
    run_dir = tmp_path / "run"
    for stage, dep in zip(plan.stages, (None, "afterok:41", "afterok:42")):
        executor = sbatch.stage_executor(plan, stage, run_dir, dep)
        assert isinstance(executor, submitit.SlurmExecutor)
        submitted = executor._make_submission_file_text(executor._submitit_command_str, "uid")
        assert submitted == sbatch.render(plan, stage, run_dir, dep)


# ---------------------------------------------------------------- refused before anything runs
@pytest.mark.parametrize("cluster, key", [
    (dict(partition="debug\n#SBATCH --wrap='touch /tmp/pwned'"), "cluster.partition"),
    (dict(account="a\rb"), "cluster.account"),
    (dict(qos="q\x00"), "cluster.qos"),
    (dict(constraint="c\x1b[31m"), "cluster.constraint"),
    (dict(extra_sbatch=["--comment=a\nrm -rf /"]), "cluster.extra_sbatch[0]"),
    (dict(extra_sbatch=["--dependency=afterany:1"]), "cluster.extra_sbatch[0]"),
    (dict(extra_sbatch=["--partition=other"]), "cluster.partition"),
    (dict(extra_sbatch=["-p x"]), "cluster.extra_sbatch[0]"),
    (dict(extra_sbatch=["--signal=B:USR2@60"]), "cluster.extra_sbatch[0]"),
    (dict(setup=["module load x\nrm -rf /"]), "cluster.setup[0]"),
    (dict(env={"BAD-NAME": "x"}), "BAD-NAME"),
    (dict(env={"1X": "x"}), "1X"),
    (dict(env={"X": "a\x00b"}), "cluster.env.X"),
    (dict(env={"MLMEGA_MAX_REQUEUES": "many"}), "MLMEGA_MAX_REQUEUES"),
    (dict(max_nodes=1), "cluster.max_nodes"),  # TP=2 on one-task nodes needs 2 nodes
    (dict(python="py\nthon"), "cluster.python"),
    (dict(wckey="a\nb"), "cluster.wckey"),
    (dict(extra_sbatch=["--wckey=x"]), "cluster.wckey"),
    # the USR2 warning (90 s before the end) would come while the job starts
    (dict(time_limit_min=3), "0-pre-L0: time limit 3 min (cluster.time_limit_min"),
    (dict(time_limits={"1-bottom-L1": 2}), "1-bottom-L1: time limit 2 min (cluster.time_limits"),
    (dict(time_limit_min=6, extra_sbatch=["--signal=USR2@300"]), "USR2 warning 300 s before"),
    (dict(time_limits={"9-post-L7": 60}), "cluster.time_limits.9-post-L7: no such stage"),
    (dict(time_limits={"0-pre-L0": 0}), "cluster.time_limits.0-pre-L0=0"),
])
def test_hostile_or_impossible_values_are_refused(tmp_path, cluster, key):
    plan = make_plan(tmp_path, recipe_dict(**cluster))
    with pytest.raises(ConfigError, match=re.escape(key)):
        SlurmExecutor().check(plan, tmp_path / "run")
    with pytest.raises(ConfigError):
        SlurmExecutor().describe(plan, tmp_path / "run")


def test_newline_in_recipe_name_or_run_dir_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="name"):  # refused as the recipe is read
        make_plan(tmp_path, dict(recipe_dict(), name="x\n#SBATCH --wrap=id"))
    plan = make_plan(tmp_path, recipe_dict())
    with pytest.raises(ConfigError, match="--run-dir"):
        SlurmExecutor().check(plan, tmp_path / "run\nx")


def test_cli_refuses_before_writing_the_run_dir(tmp_path):
    data = recipe_dict(partition="debug\n#SBATCH --wrap=id")
    data["data"]["dir"] = str(tmp_path / "no-data")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    from mlmega.cli.main import main

    assert main(["run", str(recipe), "--executor", "slurm", "--run-dir", str(run_dir)]) == 2
    assert not run_dir.exists()
    assert main(["run", str(recipe), "--executor", "slurm", "--run-dir", str(run_dir),
                 "--dry-run"]) == 2


# ---------------------------------------------------------------- status from sacct (faked)
class FakeScheduler:
    def __init__(self, sacct_rows, squeue_rows=()):
        self.sacct_rows, self.squeue_rows, self.calls = list(sacct_rows), list(squeue_rows), []

    def __call__(self, cmd):
        self.calls.append(list(cmd))
        out = {"sacct": "\n".join(self.sacct_rows), "squeue": "\n".join(self.squeue_rows)}
        return subprocess.CompletedProcess(cmd, 0, out.get(cmd[0], ""), "")


def fake_state(tmp_path, plan, statuses, ids=("11", "12", "13")) -> RunState:
    state = RunState(str(tmp_path / "run"), "recipe.yaml", "slurm",
                     [StageState(s.name, status, job) for s, status, job in
                      zip(plan.stages, statuses, ids)])
    (tmp_path / "run").mkdir(exist_ok=True)
    state.save()
    return state


def test_refresh_requeued_job_is_not_failed(tmp_path, monkeypatch):
    plan = make_plan(tmp_path, recipe_dict())
    state = fake_state(tmp_path, plan, [SUBMITTED] * 3)
    fake = FakeScheduler(["11|REQUEUED|BeginTime|0:0|2026-11-25T00:34:46|2026-11-25T00:34:56",
                          "12|PENDING|Dependency|0:0|Unknown|Unknown",
                          "13|PENDING|Dependency|0:0|Unknown|Unknown"])
    fake.sacct_rows = [_sacct_order(r) for r in fake.sacct_rows]
    monkeypatch.setattr(slurm_queue, "_run", fake)
    SlurmExecutor().refresh(state, plan)
    assert [s.status for s in state.stages] == [SUBMITTED] * 3
    assert [c[0] for c in fake.calls] == ["sacct"]  # one call for all jobs
    assert fake.calls[0][fake.calls[0].index("-j") + 1] == "11,12,13"


def test_refresh_cancels_jobs_left_behind_a_failed_stage(tmp_path, monkeypatch):
    plan = make_plan(tmp_path, recipe_dict())
    state = fake_state(tmp_path, plan, [RUNNING, SUBMITTED, SUBMITTED])
    fake = FakeScheduler([_sacct_order(r) for r in (
        "11|FAILED|None|1:0|2026-11-25T00:34:46|2026-11-25T00:35:56",
        "12|PENDING|DependencyNeverSatisfied|0:0|Unknown|Unknown",
        "13|PENDING|Dependency|0:0|Unknown|Unknown")])
    monkeypatch.setattr(slurm_queue, "_run", fake)
    SlurmExecutor().refresh(state, plan)
    assert [s.status for s in state.stages] == [FAILED, CANCELLED, CANCELLED]
    assert state.stages[0].exit_code == 1 and state.stages[0].ended > state.stages[0].started
    assert fake.calls[-1] == ["scancel", "12", "13"]


def test_refresh_completed_needs_the_last_checkpoint(tmp_path, monkeypatch):
    from mlmega.checkpoint.directory import TRACKER
    from mlmega.vcycle.run import stage_dir

    plan = make_plan(tmp_path, recipe_dict())
    state = fake_state(tmp_path, plan, [RUNNING, SUBMITTED, SUBMITTED])
    done = stage_dir(tmp_path / "run", plan.stages[0].name)
    done.mkdir(parents=True)
    (done / TRACKER).write_text(str(plan.stages[0].steps))
    fake = FakeScheduler([_sacct_order(r) for r in (
        "11|COMPLETED|None|0:0|2026-11-25T00:34:46|2026-11-25T00:35:56",
        "12|COMPLETED|Dependency|0:0|2026-11-25T00:35:56|2026-11-25T00:36:56",
        "13|RUNNING|Dependency|0:0|2026-11-25T00:36:56|Unknown")])
    monkeypatch.setattr(slurm_queue, "_run", fake)
    SlurmExecutor().refresh(state, plan)
    # job 12 exited 0 without the stage's last checkpoint: not completed
    assert [s.status for s in state.stages] == [COMPLETED, FAILED, RUNNING]


def test_refresh_keeps_the_time_and_span_of_every_run_of_a_job(tmp_path, monkeypatch):
    plan = make_plan(tmp_path, recipe_dict())
    state = fake_state(tmp_path, plan, [RUNNING, SUBMITTED, SUBMITTED])
    state.stages[1].wall = {"9": 30.0}  # an earlier job of the stage (before a resume)
    fake = FakeScheduler([_sacct_order(r) for r in (  # sacct -D: oldest run first
        "11|REQUEUED|None|0:0|2026-11-25T00:30:00|2026-11-25T00:31:40",
        "11|REQUEUED|None|0:0|2026-11-25T00:32:00|2026-11-25T00:32:05",
        "11|PENDING|BeginTime|0:0|Unknown|Unknown",
        "12|REQUEUED|None|0:0|2026-11-25T00:32:05|2026-11-25T00:32:15",
        "12|PENDING|BeginTime|0:0|Unknown|Unknown",
        "13|PENDING|Dependency|0:0|Unknown|Unknown")])
    monkeypatch.setattr(slurm_queue, "_run", fake)
    SlurmExecutor().refresh(state, plan)
    assert "-D" in fake.calls[0]
    assert [s.wall for s in state.stages] == [{"11": 105.0}, {"9": 30.0, "12": 10.0}, {}]
    assert [s.wall_s for s in state.stages] == [105.0, 40.0, None]
    t = datetime(2026, 11, 25, 0, 30).timestamp()
    assert [s.spans for s in state.stages] == [  # unix seconds of each run that ended
        {"11": [[t, t + 100], [t + 120, t + 125]]}, {"12": [[t + 125, t + 135]]}, {}]
    assert [s.status for s in state.stages] == [SUBMITTED] * 3  # each job's latest run


def test_cancel_scancels_every_unfinished_job(tmp_path, monkeypatch):
    plan = make_plan(tmp_path, recipe_dict())
    state = fake_state(tmp_path, plan, [COMPLETED, RUNNING, SUBMITTED])
    fake = FakeScheduler([])
    monkeypatch.setattr(slurm_queue, "_run", fake)
    SlurmExecutor().cancel(state)
    assert fake.calls == [["scancel", "13", "12"]]
    assert [s.status for s in state.stages] == [COMPLETED, CANCELLED, CANCELLED]


def _sacct_order(row: str) -> str:
    """Test rows are JobID|State|Reason|ExitCode|Start|End; sacct prints SACCT_FIELDS' order."""
    job, state, reason, code, start, end = row.split("|")
    values = dict(JobID=job, State=state, Reason=reason, ExitCode=code, Start=start, End=end)
    return "|".join(values[f] for f in slurm_queue.SACCT_FIELDS)


@pytest.mark.parametrize("profile", sorted((Path(__file__).resolve().parents[2] / "slurm" /
                                             "profiles").glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_profiles_are_valid(tmp_path, profile):
    cluster = yaml.safe_load(profile.read_text())["cluster"]
    data = recipe_dict(**cluster)
    if cluster.get("gpus_per_node"):
        data.pop("sizing")  # sized by the plan from GPU memory
    plan = make_plan(tmp_path, data)
    text = SlurmExecutor().describe(plan, tmp_path / "run")
    assert text.count("#SBATCH --requeue") == len(plan.stages)


# ---------------------------------------------------------------- launch / resume (faked sbatch)
def fake_submit(monkeypatch, first_id: int = 100) -> list:
    submitted = []

    def submit(self, plan, stage, run_dir, dependency, requeues):
        submitted.append((stage.name, dependency))
        return str(first_id + len(submitted) - 1)

    monkeypatch.setattr(SlurmExecutor, "_submit", submit)
    return submitted


def test_launch_chains_every_stage(tmp_path, monkeypatch):
    plan = make_plan(tmp_path, recipe_dict())
    state = fake_state(tmp_path, plan, ["pending"] * 3, ids=(None, None, None))
    submitted = fake_submit(monkeypatch)
    monkeypatch.setattr(slurm_queue, "_run", FakeScheduler([]))
    SlurmExecutor().launch(state, plan, log=lambda *a: None)
    assert submitted == [("0-pre-L0", None), ("1-bottom-L1", "afterok:100"),
                         ("2-post-L0", "afterok:101")]
    saved = RunState.load(tmp_path / "run")
    assert [(s.status, s.job_id, s.attempts) for s in saved.stages] == \
        [(SUBMITTED, "100", 1), (SUBMITTED, "101", 1), (SUBMITTED, "102", 1)]


def test_resume_keeps_live_jobs_and_resubmits_the_rest(tmp_path, monkeypatch):
    """Stage 0 completed, stage 1 still running (kept, not resubmitted), stage 2 cancelled."""
    plan = make_plan(tmp_path, recipe_dict())
    state = fake_state(tmp_path, plan, [COMPLETED, "pending", "pending"])
    submitted = fake_submit(monkeypatch)
    fake = FakeScheduler([], ["12|RUNNING|None"])
    monkeypatch.setattr(slurm_queue, "_run", fake)
    SlurmExecutor().launch(state, plan, log=lambda *a: None)
    assert submitted == [("2-post-L0", "afterok:12")]
    assert [(s.status, s.job_id) for s in state.stages] == \
        [(COMPLETED, "11"), (RUNNING, "12"), (SUBMITTED, "100")]
    assert [c[0] for c in fake.calls] == ["squeue"]


def test_resume_replaces_jobs_that_wait_for_a_replaced_job(tmp_path, monkeypatch):
    """Stage 1 failed: resubmitted; stage 2's queued job waited for the old one: cancelled and
    resubmitted after the new one."""
    plan = make_plan(tmp_path, recipe_dict())
    state = fake_state(tmp_path, plan, [COMPLETED, "pending", "pending"])
    submitted = fake_submit(monkeypatch)
    fake = FakeScheduler([], ["13|PENDING|Dependency"])
    monkeypatch.setattr(slurm_queue, "_run", fake)
    SlurmExecutor().launch(state, plan, log=lambda *a: None)
    assert submitted == [("1-bottom-L1", None), ("2-post-L0", "afterok:100")]
    assert ["scancel", "13"] in fake.calls
    assert [s.attempts for s in state.stages] == [0, 1, 1]


def test_resume_waits_for_an_ending_job(tmp_path, monkeypatch):
    """A cancelled job still saving its checkpoint (COMPLETING): the stage's new job follows it."""
    plan = make_plan(tmp_path, recipe_dict())
    state = fake_state(tmp_path, plan, [COMPLETED, "pending", "pending"])
    submitted = fake_submit(monkeypatch)
    monkeypatch.setattr(slurm_queue, "_run", FakeScheduler([], ["12|COMPLETING|None"]))
    SlurmExecutor().launch(state, plan, log=lambda *a: None)
    assert submitted == [("1-bottom-L1", "afterany:12"), ("2-post-L0", "afterok:100")]
