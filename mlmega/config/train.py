"""The stage config: what one ``mlmega train`` run trains, on which data, from where, how long."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from mlmega.config.errors import ConfigError
from mlmega.config.sections import check_fields, checked, section_from_mapping
from mlmega.config.model import ModelConfig
from mlmega.config.performance import PerformanceConfig
from mlmega.config.schemes import LevelSchemes

DECAY_STYLES = ("linear", "cosine", "constant")
INIT_OPS = ("reshard", "coalesce", "decoalesce", "interpolate")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warm-up then decay (megatron-core's optimizer and LR scheduler)."""

    lr: float = checked(1e-3, gt=0)
    min_lr: float = checked(0.0, ge=0)
    warmup_steps: int = checked(0, ge=0)
    decay_style: str = checked("linear", choices=DECAY_STYLES)
    weight_decay: float = checked(0.01, ge=0)
    clip_grad: float = checked(1.0, ge=0)  # 0: no clipping
    beta1: float = checked(0.9, ge=0, lt=1)
    beta2: float = checked(0.95, ge=0, lt=1)
    eps: float = checked(1e-8, gt=0)


@dataclass(frozen=True)
class InitConfig:
    """Start from another checkpoint, transformed per rank at load time (no separate conversion)."""

    checkpoint: str
    op: str = checked("reshard", choices=INIT_OPS)
    schemes: Optional[LevelSchemes] = None
    large: Optional[str] = None  # interpolate: this level's own pre-coalescing checkpoint
    alpha: float = checked(0.5, ge=0, le=1)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data_dir: str
    save_dir: str
    steps: int = checked(ge=1)
    seq_length: int = checked(ge=1)
    micro_batch_size: int = checked(ge=1)
    global_batch_size: int = checked(ge=1)
    tp: int = checked(1, ge=1)
    pp: int = checked(1, ge=1)
    dp: Optional[int] = checked(None, ge=1)  # None: world size / (tp * pp)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    init: Optional[InitConfig] = None
    seed: int = checked(1234, ge=0)
    log_interval: int = checked(1, ge=1)
    eval_interval: int = checked(0, ge=0)  # 0: evaluate at the end only
    eval_iters: int = checked(2, ge=1)  # validation batches (of global_batch_size samples) each
    save_interval: int = checked(0, ge=0)  # 0: save at the end only
    exit_interval: int = checked(0, ge=0)  # stop (after saving) after this many steps; 0: never
    precision: str = checked("auto", choices=("auto", "fp32", "bf16"))  # auto: bf16 on GPU
    flops_offset: float = checked(0.0, ge=0)  # model FLOPs spent before this stage (V-cycle)
    # The sample stream: this stage reads samples [first_sample, first_sample + steps x global
    # batch) of a stream of data_samples samples (None: just those), so stages that continue one
    # another (a V-cycle's) read on where the previous one stopped, in one data order.
    first_sample: int = checked(0, ge=0)
    data_samples: Optional[int] = checked(None, ge=1)
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        def fail(key: str, expected: str) -> None:
            raise ConfigError(f"{self.source}: {key}={getattr(self, key, None)!r}: expected "
                              f"{expected}")

        check_fields(self, f"{self.source}:")
        check_fields(self.optimizer, f"{self.source}: optimizer")
        if self.init is not None:
            check_fields(self.init, f"{self.source}: init")
        if self.seq_length > self.model.max_sequence_length:
            fail("seq_length", f"at most the model's max_sequence_length="
                               f"{self.model.max_sequence_length}")
        if self.global_batch_size % self.micro_batch_size:
            fail("global_batch_size", f"a multiple of micro_batch_size={self.micro_batch_size}")
        if self.optimizer.warmup_steps >= self.steps:
            raise ConfigError(f"{self.source}: optimizer.warmup_steps={self.optimizer.warmup_steps}"
                              f": expected fewer than steps={self.steps}")
        if self.data_samples is not None and self.data_samples < self.last_sample:
            fail("data_samples", f"an integer of at least first_sample + steps x "
                                 f"global_batch_size = {self.last_sample}")

    @property
    def last_sample(self) -> int:
        """The sample stream position after this stage (Megatron's consumed_train_samples)."""
        return self.first_sample + self.steps * self.global_batch_size

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
        data["model"] = ModelConfig.from_dict(data.get("model", {}), source)
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
        """Load a stage config; its relative paths (data_dir, save_dir, init.checkpoint,
        init.large) are relative to the file's directory, so a copied run directory is
        self-contained."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read YAML: {err}") from err
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of training options")
        base, data = Path(path).parent, dict(data)
        for key in ("data_dir", "save_dir"):
            if key in data:
                data[key] = _under(base, data[key])
        if isinstance(data.get("init"), Mapping):
            data["init"] = {**data["init"], **{key: _under(base, data["init"].get(key))
                                               for key in ("checkpoint", "large")
                                               if key in data["init"]}}
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source")
        data["model"] = self.model.to_dict()
        if self.init is not None and self.init.schemes is not None:
            data["init"]["schemes"] = self.init.schemes.to_dict()
        return data


def _under(base: Path, value: Any) -> Any:
    """A relative path string as seen from ``base``; anything else as it is."""
    if isinstance(value, str) and value and not Path(value).is_absolute():
        return str(base / value)
    return value
