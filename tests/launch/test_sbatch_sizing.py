"""Rendered sbatch scripts against the plan: nodes x tasks per node is the stage's world size,
one GPU per task, TP inside a node, for a matrix of models and node shapes and for every shipped
GPU recipe's ``--dry-run``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mlmega.launch.slurm import SlurmExecutor
from mlmega.vcycle.plan import Plan, plan_vcycle
from mlmega.vcycle.recipe import load_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GPU_RECIPES = sorted(p for p in CONFIGS.glob("*.yaml")
                     if (yaml.safe_load(p.read_text()).get("cluster") or {}).get("gpus_per_node"))

MODELS = {
    "gpt-12L-768": dict(arch="gpt", num_layers=12, hidden_size=768, num_attention_heads=12,
                        vocab_size=50257, max_sequence_length=1024),
    "bert-24L-1024": dict(arch="bert", num_layers=24, hidden_size=1024, num_attention_heads=16,
                          vocab_size=30522, max_sequence_length=512),
    "gpt-36L-8192": dict(arch="gpt", num_layers=36, hidden_size=8192, num_attention_heads=64,
                         vocab_size=50257, max_sequence_length=2048),
    "gqa-32L-4096": dict(arch="gpt", num_layers=32, hidden_size=4096, num_attention_heads=32,
                         num_query_groups=8, ffn_hidden_size=11008, activation="swiglu",
                         normalization="RMSNorm", position_embedding="rope", vocab_size=32000,
                         max_sequence_length=4096, tie_embeddings=False),
}
NODES = {  # gpus_per_node, GB per GPU, max_nodes, min_gpus (rounded up to whole nodes)
    "8x80GB": (8, 80, 8, 12), "4x40GB": (4, 40, 16, 6), "6x80GB": (6, 80, 8, 8),
    "2x80GB": (2, 80, 32, 3),
}


def rendered_jobs(text: str) -> dict[str, dict[str, str]]:
    """Per stage of a dry-run: its #SBATCH options (name -> value)."""
    jobs = {}
    for section in text.split("# ===== ")[1:]:
        name = section.split(":", 1)[0]
        jobs[name] = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S*))?$", section, re.M))
    return jobs


def assert_jobs_hold_the_plan(plan: Plan, text: str) -> None:
    jobs = rendered_jobs(text)
    assert list(jobs) == [s.name for s in plan.stages]
    gpus_per_node = plan.recipe.cluster.gpus_per_node
    for stage in plan.stages:
        res, job = stage.resources, jobs[stage.name]
        nodes, tasks = int(job["nodes"]), int(job["ntasks-per-node"])
        assert nodes * tasks == res.world == res.tp * res.pp * res.dp, (stage.name, job, res)
        assert int(job["gpus-per-node"]) == tasks  # one GPU per task
        assert nodes <= plan.recipe.cluster.max_nodes
        assert tasks == gpus_per_node if nodes > 1 else tasks <= gpus_per_node  # whole nodes
        assert tasks % res.tp == 0 and gpus_per_node % res.tp == 0  # TP inside a node
        assert res.memory_gb <= plan.recipe.sizing.gpu_memory_gb * 0.85
        assert res.world >= plan.recipe.sizing.min_gpus


@pytest.mark.parametrize("nodes", sorted(NODES))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_rendered_jobs_hold_exactly_the_planned_ranks(tmp_path, model, nodes):
    gpus_per_node, memory, max_nodes, min_gpus = NODES[nodes]
    seq = min(2048, MODELS[model]["max_sequence_length"])
    recipe = dict(
        name=f"{model}-{nodes}", model=MODELS[model],
        levels=[dict(width=dict(kind="stacked", factor=2), depth=dict(kind="stacked", factor=2))],
        schedule=dict(coalesce_steps=[100], bottom_steps=1000, decoalesce_steps=[1000],
                      lr=[1.0e-4, 2.0e-4]),
        training=dict(seq_length=seq, micro_batch_size=1, global_batch_size=480),
        data=dict(dir="/shared/data", prepare=False),
        cluster=dict(executor="slurm", partition="gpu", gpus_per_node=gpus_per_node,
                     max_nodes=max_nodes, time_limit_min=1440),
        sizing=dict(gpu_memory_gb=memory, min_gpus=min_gpus))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    plan = plan_vcycle(load_recipe(path))
    assert_jobs_hold_the_plan(plan, SlurmExecutor().describe(plan, tmp_path / "run"))


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: p.stem)
def test_dry_run_of_shipped_gpu_recipes_holds_the_plan(tmp_path, recipe):
    """What ``mlmega run RECIPE --executor slurm --dry-run`` prints, for every GPU recipe."""
    plan = plan_vcycle(load_recipe(recipe))
    assert_jobs_hold_the_plan(plan, SlurmExecutor().describe(plan, tmp_path / "run"))


def test_shipped_gpu_recipes_exist():
    assert {p.stem for p in GPU_RECIPES} >= {"gpt-base", "bert-base", "bert-large-3level"}


def test_readme_cluster_example_renders(tmp_path):
    """The README's ``cluster:``/``sizing:`` example on gpt-base: its python, wckey and limits."""
    readme = (CONFIGS.parent / "README.md").read_text()
    example = yaml.safe_load(re.search(r"```yaml\n(cluster:.*?)```", readme, re.S).group(1))
    recipe = dict(yaml.safe_load((CONFIGS / "gpt-base.yaml").read_text()), **example)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    plan = plan_vcycle(load_recipe(path))
    text = SlurmExecutor().describe(plan, tmp_path / "run")
    assert_jobs_hold_the_plan(plan, text)
    jobs = rendered_jobs(text)
    assert [jobs[s.name]["time"] for s in plan.stages] == ["30", "81", "600"]
    assert all(job["wckey"] == "my-project" for job in jobs.values())
    assert text.count(" /shared/envs/mlmega/bin/python -u -m mlmega.launch.job_main ") == 3
