"""A V-cycle run directory: the stage configs the jobs read, and the state file they update.

    RUN_DIR/recipe.yaml            the recipe as planned (with overrides applied)
    RUN_DIR/state.json             stages: status, job ids, checkpoint, metrics (atomic writes)
    RUN_DIR/stages/NAME.yaml       each stage's ``mlmega train`` config
    RUN_DIR/stages/NAME/           each stage's checkpoints and metrics.jsonl
    RUN_DIR/logs/                  job logs
Stage configs reference earlier stages' checkpoint directories, so a job started from this
directory (any node, any time) finds its inputs on the shared filesystem.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import yaml

from mlmega.checkpoint.atomic import write_text_atomic
from mlmega.checkpoint.torch_format import TRACKER
from mlmega.config.errors import ConfigError
from mlmega.train.config import TrainConfig
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


@dataclass
class RunState:
    """What ``state.json`` holds; ``save`` rewrites it atomically."""

    run_dir: str
    recipe: str
    executor: str
    stages: list[StageState] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / "state.json"

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(asdict(self), indent=2) + "\n")

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
                 flops_offset: float) -> TrainConfig:
    """The ``mlmega train`` config of one stage of the run."""
    from mlmega.train.config import InitConfig, OptimizerConfig

    recipe, train, res = plan.recipe, plan.recipe.training, stage.resources
    init = None
    if stage.init is not None:
        large = str(stage_dir(run_dir, stage.init.large)) if stage.init.large else None
        init = InitConfig(checkpoint=str(stage_dir(run_dir, stage.init.source)), op=stage.init.op,
                          schemes=stage.init.schemes, large=large, alpha=stage.init.alpha)
    return TrainConfig(
        model=stage.model, data_dir=str(data_dir), save_dir=str(stage_dir(run_dir, stage.name)),
        steps=stage.steps, seq_length=train.seq_length, micro_batch_size=res.micro_batch_size,
        global_batch_size=res.global_batch_size, tp=res.tp, pp=res.pp, dp=res.dp,
        optimizer=OptimizerConfig(lr=stage.lr, min_lr=stage.min_lr,
                                  warmup_steps=stage.warmup_steps, decay_style=stage.decay_style,
                                  weight_decay=train.weight_decay, clip_grad=train.clip_grad,
                                  beta2=train.beta2),
        performance=replace(recipe.performance, recompute=res.recompute),
        init=init, seed=train.seed, log_interval=train.log_interval,
        eval_interval=train.eval_interval, eval_iters=train.eval_iters,
        save_interval=train.save_interval, flops_offset=flops_offset,
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
    write_text_atomic(run_dir / "recipe.yaml", yaml.safe_dump(_recipe_dict(plan.recipe)))
    offset = 0.0
    for stage in stages:
        cfg = train_config(plan, stage, run_dir, data_dir, offset)
        write_text_atomic(stage_config_path(run_dir, stage.name), yaml.safe_dump(cfg.to_dict()))
        offset += stage.flops
    state = RunState(str(run_dir), plan.recipe.source, executor,
                     [StageState(s.name) for s in stages])
    state.save()
    return state


def _recipe_dict(recipe: Recipe) -> dict:
    data = asdict(recipe)
    data.pop("source")
    data["model"] = recipe.model.to_dict()
    data["levels"] = [level.to_dict() for level in recipe.levels]
    return json.loads(json.dumps(data))  # tuples -> lists, for YAML
