"""A V-cycle run directory: the stage configs the jobs read, and the state file they update.

    RUN_DIR/recipe.yaml            the recipe as planned (with overrides applied)
    RUN_DIR/state.json             stages: status, job ids, checkpoint, metrics (atomic writes)
    RUN_DIR/stages/NAME.yaml       each stage's ``mlmega train`` config
    RUN_DIR/stages/NAME/           each stage's checkpoints and metrics.jsonl
    RUN_DIR/logs/STAGE/JOB/        local jobs' logs, one .out/.err pair per rank (SLURM's:
                                   RUN_DIR/submitit/STAGE/JOB/)
    RUN_DIR/writer.lock            held by the one process writing the run (:mod:`.lock`)
Stage configs reference earlier stages' checkpoint directories, so a job started from this
directory (any node, any time) finds its inputs on the shared filesystem. Paths inside the run are
relative to it (state.json holds none; stage configs name their checkpoints relative to
``stages/``): a copied run directory resumes as itself.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import yaml

from mlmega.checkpoint.atomic import write_text_atomic
from mlmega.checkpoint.directory import TRACKER
from mlmega.config.errors import ConfigError
from mlmega.config.train import TrainConfig
from mlmega.vcycle.plan import Plan, Stage
from mlmega.vcycle.recipe import Recipe

PENDING, SUBMITTED, RUNNING, COMPLETED, FAILED, CANCELLED = (
    "pending", "submitted", "running", "completed", "failed", "cancelled")
FINAL_STATES = (COMPLETED, FAILED, CANCELLED)


@dataclass
class StageState:
    name: str
    status: str = PENDING
    job_id: Optional[str] = None
    attempts: int = 0
    started: Optional[float] = None
    ended: Optional[float] = None
    exit_code: Optional[int] = None
    wall: dict[str, float] = field(default_factory=dict)  # job id -> seconds run (all attempts)
    # job id -> [start, end] (unix s) of each run that ended (a requeued SLURM job runs again)
    spans: dict[str, list[list[float]]] = field(default_factory=dict)
    first_sample: int = 0  # samples consumed by the stages before it (its data starts there)

    def __post_init__(self):
        # a state file written before a job's runs were kept apart: job id -> [start, end]
        self.spans = {job: [runs] if runs and not isinstance(runs[0], list) else runs
                      for job, runs in self.spans.items()}

    @property
    def wall_s(self) -> Optional[float]:
        """Wall-clock seconds over every job and requeue of the stage (None before any ran)."""
        return sum(self.wall.values()) if self.wall else None


@dataclass
class RunState:
    """What ``state.json`` holds (all but ``run_dir``: where it was loaded from); ``save`` rewrites
    it atomically."""

    run_dir: str
    recipe: str
    executor: str
    stages: list[StageState] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / "state.json"

    def save(self) -> None:
        data = asdict(self)
        data.pop("run_dir")
        write_text_atomic(self.path, json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunState":
        path = Path(run_dir) / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{run_dir}: not a run directory (no state.json)") from None
        except ValueError as err:
            raise ConfigError(f"{path}: unreadable state file: {err}") from None
        data["stages"] = [StageState(**s) for s in data["stages"]]
        data["run_dir"] = str(Path(run_dir).absolute())  # a copy is its own run
        return cls(**data)

    def stage(self, name: str) -> StageState:
        return next(s for s in self.stages if s.name == name)


def stage_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "stages" / name


def stage_config_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "stages" / f"{name}.yaml"


def stage_finished(run_dir: Path, stage: Stage) -> bool:
    """A stage is done when its checkpoint reached the stage's last step."""
    return saved_step(run_dir, stage.name) == stage.steps


def saved_step(run_dir: Path, name: str) -> int:
    """The step of a stage's latest checkpoint (0: none yet)."""
    try:
        return int((stage_dir(run_dir, name) / TRACKER).read_text().strip())
    except (OSError, ValueError):
        return 0


def train_config(plan: Plan, stage: Stage, run_dir: Path, data_dir: Path,
                 flops_offset: float, first_sample: int) -> TrainConfig:
    """The ``mlmega train`` config of one stage of the run (checkpoint paths relative to the
    config's directory, ``stages/``)."""
    from mlmega.config.train import InitConfig, OptimizerConfig

    train, res = plan.recipe.training, stage.resources
    init = None
    if stage.init is not None:
        init = InitConfig(checkpoint=stage.init.source, op=stage.init.op,
                          schemes=stage.init.schemes, large=stage.init.large,
                          alpha=stage.init.alpha)
    return TrainConfig(
        model=stage.model, data_dir=str(data_dir), save_dir=stage.name,
        steps=stage.steps, seq_length=train.seq_length, micro_batch_size=res.micro_batch_size,
        global_batch_size=res.global_batch_size, tp=res.tp, pp=res.pp, dp=res.dp,
        optimizer=OptimizerConfig(lr=stage.lr, min_lr=stage.min_lr,
                                  warmup_steps=stage.warmup_steps, decay_style=stage.decay_style,
                                  weight_decay=train.weight_decay, clip_grad=train.clip_grad,
                                  beta2=train.beta2),
        performance=replace(plan.recipe.performance, recompute=res.recompute),
        init=init, seed=train.seed, log_interval=train.log_interval,
        eval_interval=train.eval_interval, eval_iters=train.eval_iters,
        save_interval=train.save_interval, flops_offset=flops_offset,
        first_sample=first_sample, data_samples=plan.data_samples,
        source=str(stage_config_path(run_dir, stage.name)))


def create_run(plan: Plan, run_dir: Path, data_dir: Path, executor: str,
               stages: Optional[list[Stage]] = None) -> RunState:
    """Write the run directory (refusing one that holds another run) and its initial state."""
    run_dir = Path(run_dir)
    if (run_dir / "state.json").exists():
        raise ConfigError(f"{run_dir} already holds a run; use `mlmega resume {run_dir}` or "
                          f"choose another --run-dir")
    stages = list(stages if stages is not None else plan.stages)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    record_recipe(run_dir, as_run(plan.recipe, data_dir))
    flops, first_sample, entries = 0.0, 0, []
    for stage in stages:  # each stage continues the previous one's FLOPs and sample stream
        cfg = train_config(plan, stage, run_dir, data_dir, flops, first_sample)
        write_text_atomic(stage_config_path(run_dir, stage.name), yaml.safe_dump(cfg.to_dict()))
        entries.append(StageState(stage.name, first_sample=first_sample))
        flops, first_sample = flops + stage.flops, cfg.last_sample
    state = RunState(str(run_dir.absolute()), plan.recipe.source, executor, entries)
    state.save()
    return state


def as_run(recipe: Recipe, data_dir: Path) -> Recipe:
    """The recipe as a run follows it: with the data directory it uses."""
    return replace(recipe, data=replace(recipe.data, dir=str(data_dir)))


def record_recipe(run_dir: Path, recipe: Recipe) -> None:
    """Write ``RUN_DIR/recipe.yaml``: the recipe the run follows (overrides applied)."""
    write_text_atomic(Path(run_dir) / "recipe.yaml", yaml.safe_dump(recipe_dict(recipe)))


def recipe_dict(recipe: Recipe) -> dict:
    """The recipe as RUN_DIR/recipe.yaml holds it (plain YAML types)."""
    data = asdict(recipe)
    data.pop("source")
    data["model"] = recipe.model.to_dict()
    data["levels"] = [level.to_dict() for level in recipe.levels]
    return json.loads(json.dumps(data))  # tuples -> lists, for YAML
