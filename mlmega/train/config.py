"""The stage config: what one ``mlmega train`` run trains, on which data, from where, how long."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from mlmega.config.errors import ConfigError
from mlmega.config.sections import section_from_mapping
from mlmega.config.model import ModelConfig
from mlmega.config.performance import PerformanceConfig
from mlmega.operators import LevelSchemes

DECAY_STYLES = ("linear", "cosine", "constant")
INIT_OPS = ("reshard", "coalesce", "decoalesce", "interpolate")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warm-up then decay (megatron-core's optimizer and LR scheduler)."""

    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_style: str = "linear"
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass(frozen=True)
class InitConfig:
    """Start from another checkpoint, transformed per rank at load time (no separate conversion)."""

    checkpoint: str
    op: str = "reshard"
    schemes: Optional[LevelSchemes] = None
    large: Optional[str] = None  # interpolate: this level's own pre-coalescing checkpoint
    alpha: float = 0.5


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data_dir: str
    save_dir: str
    steps: int
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    tp: int = 1
    pp: int = 1
    dp: Optional[int] = None  # None: world size / (tp * pp)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    init: Optional[InitConfig] = None
    seed: int = 1234
    log_interval: int = 1
    eval_interval: int = 0  # 0: evaluate at the end only
    eval_iters: int = 2  # validation batches (of global_batch_size samples) per evaluation
    save_interval: int = 0  # 0: save at the end only
    exit_interval: int = 0  # stop (after saving) once this many steps are done; 0: never
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    flops_offset: float = 0.0  # model FLOPs already spent before this stage (V-cycle accounting)
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        def fail(key: str, expected: str) -> None:
            raise ConfigError(f"{self.source}: {key}={getattr(self, key, None)!r}: expected "
                              f"{expected}")

        for key in ("steps", "seq_length", "micro_batch_size", "global_batch_size", "tp", "pp"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                fail(key, "a positive integer")
        if self.seq_length > self.model.max_sequence_length:
            fail("seq_length", f"at most the model's max_sequence_length="
                               f"{self.model.max_sequence_length}")
        if self.global_batch_size % self.micro_batch_size:
            fail("global_batch_size", f"a multiple of micro_batch_size={self.micro_batch_size}")
        if self.optimizer.warmup_steps >= self.steps:
            raise ConfigError(f"{self.source}: optimizer.warmup_steps={self.optimizer.warmup_steps}"
                              f": expected fewer than steps={self.steps}")
        if self.optimizer.decay_style not in DECAY_STYLES:
            raise ConfigError(f"{self.source}: optimizer.decay_style="
                              f"{self.optimizer.decay_style!r}: expected one of {DECAY_STYLES}")
        if self.precision not in ("auto", "fp32", "bf16"):
            fail("precision", "auto, fp32 or bf16")
        if self.init is not None and self.init.op not in INIT_OPS:
            raise ConfigError(f"{self.source}: init.op={self.init.op!r}: expected one of {INIT_OPS}")

    @property
    def metrics_path(self) -> Path:
        return Path(self.save_dir) / "metrics.jsonl"

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "TrainConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown training option(s) {unknown}; known: "
                              f"{sorted(known)}")
        data["model"] = ModelConfig.from_dict(data.get("model", {}), f"{source}: model")
        data["optimizer"] = section_from_mapping(OptimizerConfig, data.get("optimizer", {}), f"{source}: optimizer")
        data["performance"] = section_from_mapping(PerformanceConfig, data.get("performance", {}),
                                                   f"{source}: performance")
        if data.get("init") is not None:
            init = dict(data["init"])
            if init.get("schemes") is not None:
                init["schemes"] = LevelSchemes.from_dict(init["schemes"], f"{source}: init.schemes")
            data["init"] = section_from_mapping(InitConfig, init, f"{source}: init")
        try:
            return cls(**data, source=source)
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read YAML: {err}") from err
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of training options")
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source")
        data["model"] = self.model.to_dict()
        if self.init is not None and self.init.schemes is not None:
            data["init"]["schemes"] = self.init.schemes.to_dict()
        return data
