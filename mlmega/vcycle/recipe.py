"""A V-cycle recipe: the base model, its coarser levels, the step schedule, data and cluster.

Loaded from YAML into typed dataclasses, with ``--set key.sub=value`` overrides from the CLI.
Everything is validated here, before anything is planned or submitted.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from mlmega.config.errors import ConfigError
from mlmega.config.sections import check_fields, checked, section_from_mapping
from mlmega.config.model import ModelConfig
from mlmega.config.performance import PerformanceConfig
from mlmega.config.schemes import LevelSchemes
from mlmega.config.train import DECAY_STYLES
from mlmega.operators import LevelMap

EXECUTORS = ("local", "slurm")
RUN_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # a run's name is a path component under runs/


@dataclass(frozen=True)
class DataConfig:
    """Prepared data (``mlmega data prepare``); prepared on first use when ``prepare`` is set."""

    dir: str = "data/{arch}"
    prepare: bool = True  # prepare the embedded corpus into ``dir`` if it is missing
    vocab_size: int = checked(2048, ge=1)
    inputs: tuple[str, ...] = ()  # empty: the embedded Shakespeare corpus


@dataclass(frozen=True)
class TrainingConfig:
    """Settings shared by every stage (the batch is kept across levels)."""

    seq_length: int = checked(128, ge=1)
    micro_batch_size: int = checked(8, ge=1)
    global_batch_size: int = checked(32, ge=1)
    seed: int = checked(1234, ge=0)
    warmup_steps: int = checked(0, ge=0)
    weight_decay: float = checked(0.01, ge=0)
    clip_grad: float = checked(1.0, ge=0)  # 0: no clipping
    beta2: float = checked(0.95, ge=0, lt=1)
    eval_interval: int = checked(50, ge=0)
    eval_iters: int = checked(4, ge=1)
    save_interval: int = checked(0, ge=0)
    log_interval: int = checked(10, ge=1)
    # Length of the sample stream (one data order) that the V-cycle's stages read on from one
    # another and the baseline reads from its start; None: the longer of the two runs.
    data_samples: Optional[int] = checked(None, ge=1)


@dataclass(frozen=True)
class ScheduleConfig:
    """Steps and learning rates of the V-cycle (the paper's E_a, E_small and final stages).

    ``coalesce_steps[k]``: steps at level k before coalescing to level k+1 (ends at peak LR).
    ``bottom_steps``: steps at the smallest level (no warm-up; ``bottom_decay``: linear, or
    constant to keep the peak LR: de-coalescing re-warms the LR, undoing an annealed minimum).
    ``decoalesce_steps[k]``: steps at level k after de-coalescing + interpolation (linear decay at
    level 0; levels in between are de-coalesced again, so they decay as ``bottom_decay`` says).
    ``decoalesce_warmup_steps[k]``: LR warm-up of the stage after de-coalescing to level k (its
    optimizer starts anew on a trained model); empty: every such stage starts at its peak LR.
    ``lr[k]``: peak learning rate of level k (smaller levels use higher LRs).
    ``decoalesce_lr[k]``: peak LR of the stage after de-coalescing to level k, where it should not
    restart at ``lr[k]`` (e.g. a lower one, as if the level's schedule went on); empty: ``lr``.
    ``baseline_steps``: the full model trained alone for the comparison (default: the V-cycle's
    steps at level 0).
    """

    coalesce_steps: tuple[int, ...] = checked(ge=1)
    bottom_steps: int = checked(ge=1)
    decoalesce_steps: tuple[int, ...] = checked(ge=1)
    lr: tuple[float, ...] = checked(gt=0)
    alpha: float = checked(0.5, ge=0, le=1)
    decoalesce_warmup_steps: tuple[int, ...] = checked((), ge=0)
    decoalesce_lr: tuple[float, ...] = checked((), gt=0)
    min_lr_ratio: float = checked(0.0, ge=0, le=1)
    baseline_steps: Optional[int] = checked(None, ge=1)
    bottom_decay: str = checked("linear", choices=DECAY_STYLES)  # the bottom stage's decay_style


@dataclass(frozen=True)
class ClusterConfig:
    """Where stages run: the local executor or a SLURM cluster profile (sbatch settings)."""

    executor: str = checked("local", choices=EXECUTORS)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus_per_node: int = checked(0, ge=0)  # 0: CPU nodes (gloo)
    cpus_per_task: int = checked(1, ge=1)
    tasks_per_node: Optional[int] = checked(None, ge=1)  # CPU clusters: ranks per node (default 1)
    mem_gb: Optional[float] = checked(None, gt=0)
    max_nodes: int = checked(1, ge=1)
    # Each stage's --time: its planned time (measured where a run has timed it, else estimated from
    # sizing.mfu) x time_limit_margin, at least time_limit_floor_min and at most time_limit_min (the
    # partition's limit: a longer stage saves and requeues itself); time_limits[stage] overrides.
    time_limit_min: int = checked(60, ge=1)
    time_limit_margin: float = checked(1.5, ge=1)  # the planned time is multiplied by it
    time_limit_floor_min: int = checked(30, ge=1)
    time_limits: Mapping[str, int] = field(default_factory=dict)  # stage name -> minutes
    extra_sbatch: tuple[str, ...] = ()  # extra "--key=value" sbatch options
    setup: tuple[str, ...] = ()  # shell lines run before the job (module load, venv activate)
    python: Optional[str] = None  # the job's interpreter (default: the one running mlmega)
    wckey: Optional[str] = None  # sbatch --wckey (none unless set)
    env: Mapping[str, str] = field(default_factory=dict)  # exported to the job, quoted


@dataclass(frozen=True)
class SizingConfig:
    """How the plan sizes each stage's job (see :mod:`mlmega.vcycle.sizing`)."""

    gpu_memory_gb: float = checked(80.0, gt=0)
    memory_headroom: float = checked(0.85, gt=0, le=1)  # use at most this fraction of GPU memory
    gpu_peak_tflops: float = checked(989.0, gt=0)  # H100 bf16 dense; for GPU-hour estimates
    mfu: float = checked(0.40, gt=0, le=1)  # assumed model FLOPs utilisation for those estimates
    min_gpus: int = checked(1, ge=1)  # never size a stage below this many GPUs (throughput floor)
    tp: Optional[int] = checked(None, ge=1)  # force a TP size (CPU runs, tests)
    pp: Optional[int] = checked(None, ge=1)  # force a PP size
    dp: Optional[int] = checked(None, ge=1)  # force a DP size


@dataclass(frozen=True)
class Recipe:
    name: str = checked(pattern=RUN_NAME, pattern_text="a plain name: letters, digits, '.', '_', "
                                                       "'-', starting with a letter or digit")
    model: ModelConfig
    levels: tuple[LevelSchemes, ...]  # levels[k] maps level k to level k+1
    schedule: ScheduleConfig
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sizing: SizingConfig = field(default_factory=SizingConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)  # every stage's
    baseline: Optional[str] = None  # a baseline run (its directory or metrics) for the loss plot
    source: str = field(default="<recipe>", compare=False)

    @property
    def num_levels(self) -> int:
        return len(self.levels) + 1

    def level_models(self) -> list[ModelConfig]:
        """The model of every level, largest first (validates every scheme against its level)."""
        models = [self.model]
        for k, schemes in enumerate(self.levels):  # errors name the scheme or the level's model
            large = models[-1].replace(source=f"{self.source}: levels[{k}]")
            models.append(LevelMap.from_large(large, schemes).small)
        return models

    def validate(self) -> None:
        s, k = self.schedule, len(self.levels)
        if k < 1:
            raise ConfigError(f"{self.source}: levels: expected at least one coarser level")
        for key, want, optional in (("coalesce_steps", k, False), ("decoalesce_steps", k, False),
                                    ("lr", k + 1, False), ("decoalesce_warmup_steps", k, True),
                                    ("decoalesce_lr", k, True)):
            count = len(getattr(s, key))
            if count != want and not (optional and count == 0):
                raise ConfigError(f"{self.source}: schedule.{key} has {count} entries; expected "
                                  f"{want}{' (or none)' if optional else ''} for {k + 1} levels")
        if self.baseline is not None and not isinstance(self.baseline, str):
            raise ConfigError(f"{self.source}: baseline={self.baseline!r}: expected the path of "
                              f"a baseline run directory or metrics file")
        t = self.training
        if t.warmup_steps >= s.coalesce_steps[0]:
            raise ConfigError(f"{self.source}: training.warmup_steps={t.warmup_steps} must end "
                              f"within the first stage (schedule.coalesce_steps[0]="
                              f"{s.coalesce_steps[0]})")
        for j, (warmup, steps) in enumerate(zip(s.decoalesce_warmup_steps, s.decoalesce_steps)):
            if warmup >= steps:
                raise ConfigError(f"{self.source}: schedule.decoalesce_warmup_steps[{j}]={warmup} "
                                  f"must end within its stage (schedule.decoalesce_steps[{j}]="
                                  f"{steps})")
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(f"{self.source}: training.global_batch_size={t.global_batch_size} "
                              f"is not a multiple of micro_batch_size={t.micro_batch_size}")
        if t.seq_length > self.model.max_sequence_length:
            raise ConfigError(f"{self.source}: training.seq_length={t.seq_length} exceeds "
                              f"model.max_sequence_length={self.model.max_sequence_length}")
        self.level_models()


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe YAML, apply ``key.sub=value`` overrides (values parsed as YAML), validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read recipe: {err}") from err
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data = copy.deepcopy(dict(data))
    for item in overrides:
        _apply_override(data, item, str(path))
    recipe = recipe_from_dict(data, str(path))
    recipe.validate()
    return recipe


def _apply_override(data: dict, item: str, source: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. schedule.alpha=0.25)")
    key, value = item.split("=", 1)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section of {source}")
    node[parts[-1]] = yaml.safe_load(value)


def recipe_from_dict(data: Mapping[str, Any], source: str) -> Recipe:
    known = {f.name for f in dataclasses.fields(Recipe)} - {"source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown recipe section(s) {unknown}; known: {sorted(known)}")
    for required in ("name", "model", "levels", "schedule"):
        if required not in data:
            raise ConfigError(f"{source}: the recipe needs a '{required}' section")
    levels = data["levels"]
    if not isinstance(levels, list):
        raise ConfigError(f"{source}: levels: expected a list of {{width, depth}} schemes")
    recipe = Recipe(
        name=data["name"],
        model=ModelConfig.from_dict(data["model"], source),
        levels=tuple(LevelSchemes.from_dict(lv, f"{source}: levels[{i}]")
                     for i, lv in enumerate(levels)),
        schedule=section_from_mapping(ScheduleConfig, data["schedule"], f"{source}: schedule"),
        data=section_from_mapping(DataConfig, data.get("data", {}), f"{source}: data"),
        training=section_from_mapping(TrainingConfig, data.get("training", {}), f"{source}: training"),
        cluster=section_from_mapping(ClusterConfig, data.get("cluster", {}), f"{source}: cluster"),
        sizing=section_from_mapping(SizingConfig, data.get("sizing", {}), f"{source}: sizing"),
        performance=section_from_mapping(PerformanceConfig, data.get("performance", {}),
                                         f"{source}: performance"),
        baseline=data.get("baseline"),
        source=source,
    )
    check_fields(recipe, f"{source}:")
    return recipe

