"""``plan_vcycle``: the recipe as a list of stages, each with its model, steps, LR, init and job.

Stages of a K-level V-cycle (level 0 = the full model):
  pre k     (k = 0..K-2)  train level k for coalesce_steps[k]; warm-up (level 0) then constant LR;
                          level k > 0 starts from pre k-1 coalesced
  bottom    (level K-1)   bottom_steps from pre K-2 coalesced; no warm-up, bottom_decay (linear)
  post k    (k = K-2..0)  from interpolate(pre k, de-coalesce(previous stage), alpha); linear decay
                          at level 0; bottom_decay at the levels in between (de-coalesced again)
Each stage reads the samples after the previous stage's (one sample stream, one data order).
The baseline is the full model trained alone for the same number of tokens (or baseline_steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig
from mlmega.models.flops import training_flops_per_token
from mlmega.models.params import num_parameters
from mlmega.config.schemes import LevelSchemes
from mlmega.vcycle.recipe import Recipe
from mlmega.vcycle.sizing import Resources, fixed_resources, size_stage


@dataclass(frozen=True)
class StageInit:
    """How a stage's weights start: an operator applied to earlier stages' final checkpoints."""

    op: str  # coalesce | interpolate
    source: str  # stage name whose checkpoint is transformed
    schemes: LevelSchemes
    large: Optional[str] = None  # interpolate: the level's own pre-coalescing stage
    alpha: float = 0.5


@dataclass(frozen=True)
class Stage:
    name: str
    level: int
    kind: str  # pre | bottom | post | baseline
    model: ModelConfig
    steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    decay_style: str
    init: Optional[StageInit]
    resources: Resources
    tokens: int
    flops: float

    @property
    def parameters(self) -> int:
        return num_parameters(self.model)

    def gpu_hours(self, peak_tflops: float, mfu: float) -> float:
        return self.flops / (peak_tflops * 1e12 * mfu) / 3600


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    stages: tuple[Stage, ...]
    baseline: Stage

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.stages)

    @property
    def flops_saving_pct(self) -> float:
        return 100.0 * (1.0 - self.flops / self.baseline.flops)

    @property
    def samples_read(self) -> int:
        """The samples the longer of the V-cycle and its baseline reads."""
        longest = max(sum(s.steps for s in self.stages), self.baseline.steps)
        return longest * self.recipe.training.global_batch_size

    @property
    def data_samples(self) -> int:
        """The sample stream every run of the plan reads from (the same data order for all)."""
        return self.recipe.training.data_samples or self.samples_read

    def stage(self, name: str) -> Stage:
        """A stage of the V-cycle, or the baseline, by name."""
        return next(s for s in (*self.stages, self.baseline) if s.name == name)


def plan_vcycle(recipe: Recipe) -> Plan:
    recipe.validate()
    models = recipe.level_models()
    sched, train = recipe.schedule, recipe.training
    last = len(models) - 1
    stages: list[Stage] = []

    def add(kind, level, steps, warmup, decay, init, lr=None):
        name = f"{len(stages)}-{kind}-L{level}"
        lr = sched.lr[level] if lr is None else lr
        stages.append(_stage(recipe, name, level, kind, models[level], steps, lr, warmup, decay,
                             init))
        return name

    pre: list[str] = []
    for k in range(last):
        init = None if k == 0 else StageInit("coalesce", pre[k - 1], recipe.levels[k - 1])
        pre.append(add("pre", k, sched.coalesce_steps[k], train.warmup_steps if k == 0 else 0,
                       "constant", init))
    previous = add("bottom", last, sched.bottom_steps, 0, sched.bottom_decay,
                   StageInit("coalesce", pre[last - 1], recipe.levels[last - 1]))
    for k in reversed(range(last)):
        init = StageInit("interpolate", previous, recipe.levels[k], large=pre[k],
                         alpha=sched.alpha)
        warmup = sched.decoalesce_warmup_steps[k] if sched.decoalesce_warmup_steps else 0
        lr = sched.decoalesce_lr[k] if sched.decoalesce_lr else None
        previous = add("post", k, sched.decoalesce_steps[k], warmup,
                       "linear" if k == 0 else sched.bottom_decay, init, lr)
    baseline_steps = sched.baseline_steps or sum(s.steps for s in stages)
    baseline = _stage(recipe, "baseline", 0, "baseline", models[0], baseline_steps, sched.lr[0],
                      train.warmup_steps, "linear", None)
    plan = Plan(recipe, tuple(stages), baseline)
    if train.data_samples is not None and train.data_samples < plan.samples_read:
        batch = train.global_batch_size
        raise ConfigError(f"{recipe.source}: training.data_samples={train.data_samples} is shorter "
                          f"than the V-cycle or its baseline reads: expected at least "
                          f"{plan.samples_read} ({plan.samples_read // batch} steps x "
                          f"global_batch_size={batch})")
    return plan


def _stage(recipe: Recipe, name, level, kind, model, steps, lr, warmup, decay, init) -> Stage:
    train, tokens_per_step = recipe.training, recipe.training.seq_length * \
        recipe.training.global_batch_size
    return Stage(name=name, level=level, kind=kind, model=model, steps=steps, lr=lr,
                 min_lr=lr * recipe.schedule.min_lr_ratio, warmup_steps=warmup, decay_style=decay,
                 init=init, resources=_resources(recipe, model, f"level {level} ({name})"),
                 tokens=steps * tokens_per_step,
                 flops=steps * tokens_per_step * training_flops_per_token(model, train.seq_length))


def _resources(recipe: Recipe, model: ModelConfig, what: str) -> Resources:
    sizing, cluster, train = recipe.sizing, recipe.cluster, recipe.training
    if cluster.gpus_per_node == 0:
        return fixed_resources(model, sizing.tp or 1, sizing.pp or 1, sizing.dp or 1,
                               train.micro_batch_size, train.global_batch_size,
                               cluster.tasks_per_node or 1, what)
    return size_stage(model, train.micro_batch_size, train.global_batch_size, train.seq_length,
                      cluster.gpus_per_node, cluster.max_nodes, sizing.gpu_memory_gb,
                      sizing.memory_headroom, sizing.min_gpus, what, sizing.tp, sizing.pp,
                      sizing.dp, perf=recipe.performance)
