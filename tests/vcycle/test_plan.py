"""The plan: stages of the shipped recipes, sizing checked by hand, and bad recipes refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig
from mlmega.vcycle.plan import plan_vcycle
from mlmega.vcycle.recipe import load_recipe
from mlmega.config.performance import PerformanceConfig
from mlmega.vcycle.sizing import memory_per_gpu_gb, size_stage

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_gpt_base_plan_stages_flops_and_saving():
    """gpt-base plans its recipe: stage kinds and steps, the 6L-384 small level, Megatron-LM's
    FLOPs per step and the predicted saving (the small level at the baseline's 100k steps)."""
    plan = plan_vcycle(load_recipe(CONFIGS / "gpt-base.yaml"))
    assert [(s.kind, s.level, s.steps) for s in plan.stages] == \
        [("pre", 0, 5000), ("bottom", 1, 100000), ("post", 0, 50000)]
    small = plan.stages[1].model
    assert (small.num_layers, small.hidden_size, small.num_attention_heads) == (6, 384, 6)
    assert plan.stages[1].lr == 1.5e-4 and plan.stages[1].warmup_steps == 0
    assert plan.stages[0].decay_style == "constant" and plan.stages[2].decay_style == "linear"
    post = plan.stages[2].init
    assert (post.op, post.source, post.large, post.alpha) == \
        ("interpolate", "1-bottom-L1", "0-pre-L0", 0.9)
    # GPT-2 small: 124.4M parameters (embeddings 50257 x 768 + positions 1024 x 768 + 12 layers)
    assert plan.stages[0].parameters == pytest.approx(124.4e6, rel=2e-3)
    # FLOPs per step = 3 x 2 x (85M layer weights + 50304 x 768 logits) x tokens + causal
    # attention (half of s x s): 72 B s L h^2 (1 + s/12h + V/12hL) with B=512, s=1024, L=12,
    # h=768, V=50304 (Megatron-LM's formula)
    b, s, layers, h, v = 512, 1024, 12, 768, 50304
    per_step = 72 * b * s * layers * h * h * (1 + s / (12 * h) + v / (12 * h * layers))
    assert plan.stages[0].flops == pytest.approx(5000 * per_step, rel=1e-9)
    assert plan.baseline.flops == pytest.approx(100000 * per_step, rel=1e-9)
    assert plan.flops_saving_pct == pytest.approx(20.7, abs=0.1)


def test_sizing_by_hand_for_gpt_base():
    """GPT-2 small, micro batch 8, seq 1024, TP=PP=1: model states 18 B x 124.4M = 2.24 GB;
    activations 12 layers x 1024 x 8 x 768 x (34 + 5 x 12 x 1024 / 768) B = 8.61 GB; logits
    2 x 4 B x 1024 x 8 x 50304 = 3.30 GB; total 14.15 GB."""
    cfg = load_recipe(CONFIGS / "gpt-base.yaml").model
    assert memory_per_gpu_gb(cfg, tp=1, pp=1, micro=8, seq=1024) == pytest.approx(14.15, abs=0.02)
    # fits one 80 GB GPU; a 16 GB GPU (85% usable) holds it with selective recomputation (8.1 GB:
    # activations 12 x 1024 x 8 x 768 x 34 B = 2.57 GB); without it, DP=2 with the distributed
    # optimizer (optimizer states 12 B x 124.4M / 2: 13.40 GB), and without that TP=2
    one = size_stage(cfg, 8, 512, 1024, gpus_per_node=8, max_nodes=1, gpu_memory_gb=80,
                     headroom=0.85)
    assert (one.tp, one.pp, one.dp, one.nodes, one.recompute) == (1, 1, 1, 1, "none")
    small_gpu = size_stage(cfg, 8, 512, 1024, gpus_per_node=8, max_nodes=1, gpu_memory_gb=16,
                           headroom=0.85)
    assert (small_gpu.tp, small_gpu.pp, small_gpu.recompute) == (1, 1, "selective")
    assert small_gpu.memory_gb == pytest.approx(8.11, abs=0.02)
    no_recompute = size_stage(cfg, 8, 512, 1024, gpus_per_node=8, max_nodes=1, gpu_memory_gb=16,
                              headroom=0.85, perf=PerformanceConfig(recompute="none"))
    assert (no_recompute.tp, no_recompute.pp, no_recompute.dp) == (1, 1, 2)
    assert no_recompute.memory_gb == pytest.approx(13.40, abs=0.02)
    plain = size_stage(cfg, 8, 512, 1024, gpus_per_node=8, max_nodes=1, gpu_memory_gb=16,
                       headroom=0.85, perf=PerformanceConfig(recompute="none",
                                                             distributed_optimizer=False))
    assert (plain.tp, plain.pp) == (2, 1) and plain.memory_gb <= 16 * 0.85


def test_sizing_prefers_tp_within_a_node_before_pp():
    cfg = load_recipe(CONFIGS / "bert-large-3level.yaml").model
    res = size_stage(cfg, 32, 1024, 512, gpus_per_node=4, max_nodes=2, gpu_memory_gb=24,
                     headroom=0.85)
    assert res.pp == 1 or res.tp == 4, "PP only once TP fills a node"
    assert res.memory_gb <= 24 * 0.85


def test_impossible_size_is_a_clear_error():
    cfg = load_recipe(CONFIGS / "bert-large-3level.yaml").model
    with pytest.raises(ConfigError, match=r"does not fit 1 node\(s\) x 1 GPU\(s\) of 8 GB"):
        size_stage(cfg, 32, 1024, 512, gpus_per_node=1, max_nodes=1, gpu_memory_gb=8,
                   headroom=0.85)


def test_three_level_bert_large():
    plan = plan_vcycle(load_recipe(CONFIGS / "bert-large-3level.yaml"))
    shapes = [(s.name, s.model.num_layers, s.model.hidden_size) for s in plan.stages]
    assert shapes == [("0-pre-L0", 24, 1024), ("1-pre-L1", 12, 512), ("2-bottom-L2", 6, 256),
                      ("3-post-L1", 12, 512), ("4-post-L0", 24, 1024)]
    assert plan.stages[1].init.source == "0-pre-L0" and plan.stages[3].init.large == "1-pre-L1"
    assert plan.stages[4].init.source == "3-post-L1" and plan.stages[4].init.large == "0-pre-L0"
    # the benchmark's best schedule (5k + 5k, 100k, 50k + 40k steps) against 100k at 24L-1024
    assert [s.steps for s in plan.stages] == [5000, 5000, 100000, 50000, 40000]
    assert plan.flops_saving_pct == pytest.approx(42.28, abs=0.01)


def test_de_coalesced_stages_warm_up_as_the_recipe_says():
    """Each stage after de-coalescing to level k warms up for decoalesce_warmup_steps[k] (its
    optimizer starts anew); without the option they start at their peak LR."""
    path = CONFIGS / "bert-large-3level.yaml"  # decoalesce_steps [40000, 50000]
    posts = [s for s in plan_vcycle(load_recipe(path)).stages if s.kind == "post"]
    assert [(s.level, s.warmup_steps) for s in posts] == [(1, 0), (0, 0)]
    recipe = load_recipe(path, ["schedule.decoalesce_warmup_steps=[4000, 2000]"])
    stages = plan_vcycle(recipe).stages
    assert [(s.level, s.warmup_steps) for s in stages if s.kind == "post"] == [(1, 2000), (0, 4000)]
    assert [s.warmup_steps for s in stages if s.kind != "post"] == \
        [recipe.training.warmup_steps, 0, 0]
    with pytest.raises(ConfigError, match=r"decoalesce_warmup_steps\[1\]=50000 must end within "
                                          r"its stage \(schedule.decoalesce_steps\[1\]=50000\)"):
        load_recipe(path, ["schedule.decoalesce_warmup_steps=[4000, 50000]"])


def test_de_coalesced_stages_take_their_own_peak_lr_where_the_recipe_gives_one():
    path = CONFIGS / "bert-large-3level.yaml"
    recipe = load_recipe(path)
    lr_of = {(s.kind, s.level): s.lr for s in plan_vcycle(recipe).stages}
    assert lr_of[("post", 0)] == lr_of[("pre", 0)] == recipe.schedule.lr[0]
    assert lr_of[("post", 1)] == lr_of[("pre", 1)] == recipe.schedule.lr[1]
    recipe = load_recipe(path, ["schedule.decoalesce_lr=[5.0e-5, 7.0e-5]"])
    stages = plan_vcycle(recipe).stages
    ratio = recipe.schedule.min_lr_ratio
    assert [(s.level, s.lr, s.min_lr) for s in stages if s.kind == "post"] == \
        [(1, 7e-5, 7e-5 * ratio), (0, 5e-5, 5e-5 * ratio)]
    assert [s.lr for s in stages if s.kind != "post"] == list(recipe.schedule.lr)
    with pytest.raises(ConfigError, match=r"schedule.decoalesce_lr has 1 entries; expected 2 "
                                          r"\(or none\) for 3 levels"):
        load_recipe(path, ["schedule.decoalesce_lr=[5.0e-5]"])


@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-bert", "gpt-base", "bert-base",
                                  "bert-large-3level"])
def test_shipped_recipes_plan(name):
    plan = plan_vcycle(load_recipe(CONFIGS / f"{name}.yaml"))
    assert plan.flops_saving_pct > 0


def _write(tmp_path, changes: dict, base: str = "tiny-gpt") -> Path:
    data = yaml.safe_load((CONFIGS / f"{base}.yaml").read_text())
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"levels": [{"width": {"kind": "stacked", "factor": 3}}]},
     r"levels\[0\]: .*num_attention_heads=4 is not divisible by the stacked factor 3"),
    ({"levels": [{"depth": {"kind": "adjacent", "factor": 3}}]},
     r"num_layers=4 is not divisible by the adjacent factor 3"),
    ({"cluster": {"executor": "slurm", "partitoin": "gpu"}}, r"unknown key\(s\) \['partitoin'\]"),
    ({"schedule.lr": [1e-3]}, r"schedule.lr has 1 entries; expected 2 for 2 levels"),
    ({"schedule.alpha": 1.5}, r"schedule.alpha=1.5: expected a number in \[0, 1\]"),
    ({"schedule.decoalesce_warmup_steps": [5, 5]},
     r"schedule.decoalesce_warmup_steps has 2 entries; expected 1 \(or none\) for 2 levels"),
    ({"schedule.decoalesce_warmup_steps": [-1]},
     r"schedule.decoalesce_warmup_steps=\[-1\]: expected"),
    ({"schedule.bottom_decay": "exp"}, r"schedule.bottom_decay='exp': expected one of"),
    ({"training.seq_length": 256}, r"seq_length=256 exceeds model.max_sequence_length=128"),
    ({"training.data_samples": 3199}, r"training.data_samples=3199 is shorter than the V-cycle "
     r"or its baseline reads: expected at least 3200 \(200 steps x global_batch_size=16\)"),
    ({"training.data_samples": 4799, "schedule.baseline_steps": 300},
     r"expected at least 4800 \(300 steps x global_batch_size=16\)"),
    ({"sizing.tp": 3}, r"sizing.tp=3 does not divide the model \(4 heads"),
    ({"color": "red"}, r"unknown recipe section\(s\) \['color'\]"),
    ({"cluster.python": ["python"]}, r"cluster.python=\['python'\]: expected a string"),
    ({"cluster.time_limit_margin": 0.5}, r"cluster.time_limit_margin=0.5: expected a number >= 1"),
    ({"cluster.time_limit_floor_min": 0}, r"cluster.time_limit_floor_min=0: expected an integer"),
    ({"cluster.time_limit_min": 0}, r"cluster.time_limit_min=0: expected an integer >= 1"),
])
def test_bad_recipes_fail_before_anything_runs(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        plan_vcycle(load_recipe(_write(tmp_path, changes)))


@pytest.mark.parametrize("changes, message", [
    ({"levels": [{"width": {"kind": "stacked", "factor": 3}}]},
     "levels[0]: width: num_attention_heads=4 is not divisible by the stacked factor 3"),
    ({"model.hidden_size": 0}, "model.hidden_size=0: expected a positive integer"),
    ({"model.colour": "red"}, "unknown model option(s) ['colour']"),
])
def test_errors_name_the_file_and_the_key_once(tmp_path, changes, message):
    with pytest.raises(ConfigError) as err:
        plan_vcycle(load_recipe(_write(tmp_path, changes)))
    assert str(err.value).startswith(f"{tmp_path / 'recipe.yaml'}: {message}"), err.value
    assert str(err.value).count("recipe.yaml") == 1


def test_overrides_from_the_command_line():
    recipe = load_recipe(CONFIGS / "tiny-gpt.yaml", ["schedule.alpha=0.5", "training.seed=9"])
    assert recipe.schedule.alpha == 0.5 and recipe.training.seed == 9
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_recipe(CONFIGS / "tiny-gpt.yaml", ["schedule.alpha"])


def test_bottom_decay_sets_the_schedule_of_every_stage_that_is_de_coalesced():
    linear = plan_vcycle(load_recipe(CONFIGS / "tiny-gpt.yaml", ["schedule.bottom_decay=linear"]))
    constant = plan_vcycle(load_recipe(CONFIGS / "tiny-gpt.yaml"))  # the shipped setting
    assert [s.decay_style for s in linear.stages] == ["constant", "linear", "linear"]
    assert [s.decay_style for s in constant.stages] == ["constant", "constant", "linear"]
    # 3 levels: the middle level's post stage is de-coalesced again, so it keeps its LR too
    three = plan_vcycle(load_recipe(CONFIGS / "bert-large-3level.yaml",
                                    ["schedule.bottom_decay=constant"]))
    assert [(s.kind, s.level, s.decay_style) for s in three.stages] == [
        ("pre", 0, "constant"), ("pre", 1, "constant"), ("bottom", 2, "constant"),
        ("post", 1, "constant"), ("post", 0, "linear")]


# ---------------------------------------------------------------- layouts the allocation holds
BIG_GPT = dict(arch="gpt", num_layers=36, hidden_size=8192, num_attention_heads=64,
               vocab_size=50257, max_sequence_length=2048)


def _gpt_base(*overrides):
    return plan_vcycle(load_recipe(CONFIGS / "gpt-base.yaml", list(overrides)))


def test_36_layer_8192_gpt_on_8_gpu_nodes_fills_whole_nodes():
    """It planned TP4 PP3 DP1 (12 ranks) and rendered 2 nodes x 8 tasks; 12 ranks cannot fill
    whole 8-GPU nodes, so the plan takes the next size that does: 16 GPUs, TP8 PP2."""
    cfg = ModelConfig.from_dict(BIG_GPT)
    res = size_stage(cfg, 1, 512, 2048, gpus_per_node=8, max_nodes=8, gpu_memory_gb=80,
                     headroom=0.85, perf=PerformanceConfig(recompute="none",
                                                           distributed_optimizer=False))
    assert (res.nodes, res.tasks_per_node, res.tp, res.pp, res.dp) == (2, 8, 8, 2, 1)
    # with recomputation allowed, one node holds it (TP8, the least recomputation that fits)
    one_node = size_stage(cfg, 1, 512, 2048, gpus_per_node=8, max_nodes=8, gpu_memory_gb=80,
                          headroom=0.85)
    assert (one_node.nodes, one_node.tp, one_node.pp, one_node.recompute) == \
        (1, 8, 1, "full")
    assert res.memory_gb == pytest.approx(42.3, abs=0.1) and res.memory_gb <= 80 * 0.85
    # the layout it used to choose needs 62.8 GB per GPU: it fits, but not the nodes
    assert memory_per_gpu_gb(cfg, tp=4, pp=3, micro=1, seq=2048) == pytest.approx(62.8, abs=0.1)


@pytest.mark.parametrize("world, per_node, tp, gpus, expected", [
    (12, 8, 4, True, None),  # 1.5 nodes
    (16, 8, 4, True, (2, 8)),
    (4, 8, 4, True, (1, 4)),  # part of one node
    (16, 8, 16, True, None),  # a TP group across two nodes
    (12, 6, 4, True, None),  # TP 4 does not divide 6 GPUs: a group would straddle nodes
    (12, 6, 2, True, (2, 6)),
    (2, 1, 2, False, (2, 1)),  # CPU nodes: gloo TP across nodes is allowed
])
def test_placement_holds_exactly_the_world(world, per_node, tp, gpus, expected):
    from mlmega.vcycle.sizing import placement

    assert placement(world, per_node, tp, gpus) == expected


def test_forced_layout_passes_the_memory_check():
    """gpt-base at TP=PP=DP=1 needs 14.1 GB per GPU: refused on 8 GB GPUs, named."""
    overrides = ["sizing.tp=1", "sizing.pp=1", "sizing.dp=1", "sizing.min_gpus=1",
                 "performance.recompute=none"]  # recomputation would fit it
    assert _gpt_base(*overrides).stages[0].resources.memory_gb == \
        pytest.approx(14.1, abs=0.05)
    with pytest.raises(ConfigError, match=r"0-pre-L0\): sizing.tp/pp/dp=1/1/1 needs 14.1 GB per "
                                          r"GPU but sizing.gpu_memory_gb=8 x memory_headroom=0.85 "
                                          r"allows 6.8 GB"):
        _gpt_base(*overrides, "sizing.gpu_memory_gb=8")


def test_forced_tp_honours_min_gpus_and_fills_whole_nodes():
    """sizing.tp=2 with min_gpus=16 on 8-GPU nodes: it gave 2 nodes x 1 GPU (TP across nodes,
    min_gpus ignored); now DP fills the 16 GPUs, TP inside a node."""
    plan = _gpt_base("sizing.tp=2", "sizing.min_gpus=16")
    for stage in (*plan.stages, plan.baseline):
        res = stage.resources
        assert (res.nodes, res.tasks_per_node, res.gpus_per_node) == (2, 8, 8)
        assert (res.tp, res.pp, res.dp) == (2, 1, 8) and res.world == 16


@pytest.mark.parametrize("overrides, message", [
    (["sizing.tp=4", "cluster.gpus_per_node=6"],
     r"sizing.tp=4 does not divide cluster.gpus_per_node=6: a TP group stays inside one node"),
    (["sizing.tp=4", "sizing.pp=3", "sizing.dp=1", "sizing.min_gpus=1"],
     r"sizing.tp x pp x dp = 12 GPU\(s\) do not fill whole nodes of cluster.gpus_per_node=8"),
    (["sizing.tp=1", "sizing.pp=1", "sizing.dp=1"],
     r"sizing.tp x pp x dp = 1 GPU\(s\) is below sizing.min_gpus=8"),
    (["sizing.tp=2", "sizing.pp=1", "sizing.dp=32"],
     r"= 64 GPU\(s\) need 8 nodes of 8 GPUs but cluster.max_nodes=4"),
    (["sizing.pp=5"], r"sizing.pp=5 does not divide the model's 12 layers"),
    (["sizing.dp=3"], r"sizing.dp=3: global batch 512 is not divisible by micro batch 8 x DP 3"),
])
def test_forced_layouts_that_break_the_rules_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _gpt_base(*overrides)


@pytest.mark.parametrize("tp, tasks_per_node, nodes, per_node", [
    (2, 1, 2, 1), (4, 2, 2, 2), (3, 2, 3, 1), (2, 4, 1, 2)])
def test_cpu_jobs_hold_exactly_the_world(tp, tasks_per_node, nodes, per_node):
    from mlmega.vcycle.sizing import fixed_resources

    cfg = ModelConfig.from_dict(dict(arch="gpt", num_layers=4, hidden_size=96,
                                     num_attention_heads=12, vocab_size=512,
                                     max_sequence_length=32))
    res = fixed_resources(cfg, tp, 1, 1, 2, 8, tasks_per_node)
    assert (res.nodes, res.tasks_per_node, res.world) == (nodes, per_node, tp)
