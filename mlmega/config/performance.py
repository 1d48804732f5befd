"""megatron-core's performance switches for one run, and how ``auto`` resolves them.

A recipe's ``performance:`` section (or a stage config's) names them; sizing
(:mod:`mlmega.vcycle.sizing`) turns recompute on where memory needs it, and :meth:`resolved` fixes
the rest from the run's layout and machine, so every stage config records concrete values.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Optional

from mlmega.config.errors import ConfigError

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
RECOMPUTE = ("auto", "none", "selective", "full")


@dataclass(frozen=True)
class PerformanceConfig:
    """Switches; ``None`` / ``"auto"``: chosen by :meth:`resolved` (rules on each field)."""

    transformer_impl: str = "auto"  # auto: transformer_engine where it imports, else local
    distributed_optimizer: Optional[bool] = None  # ZeRO-1 over DP; auto: on when DP > 1
    overlap_grad_reduce: Optional[bool] = None  # auto: on with DP > 1 on GPUs (runs on gloo too)
    overlap_param_gather: Optional[bool] = None  # auto: with overlap_grad_reduce + dist. optimizer
    sequence_parallel: Optional[bool] = None  # auto: on when TP > 1 (BERT: with fused norms)
    recompute: str = "auto"  # none | selective (core attention) | full (whole layers); auto:
    #                          sizing's choice in a V-cycle, none in a stage run on its own
    fused_kernels: Optional[bool] = None  # auto: on where TransformerEngine or apex imports

    def __post_init__(self) -> None:
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError(f"performance.transformer_impl={self.transformer_impl!r}: expected "
                              f"one of {TRANSFORMER_IMPLS}")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"performance.recompute={self.recompute!r}: expected one of "
                              f"{RECOMPUTE}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "Optional[bool]" and value is not None and not isinstance(value, bool):
                raise ConfigError(f"performance.{f.name}={value!r}: expected true, false or null "
                                  f"(auto)")

    def resolved(self, arch: str, tp: int, dp: int, cuda: bool,
                 kernels: Optional[bool] = None) -> "PerformanceConfig":
        """Concrete values for a TP x DP run of an ``arch`` model on GPUs (``cuda``) or CPUs;
        refuses what cannot run there. ``kernels``: whether TransformerEngine (and so fused
        kernels) imports; None: look (sizing, planning for GPU nodes elsewhere, assumes True)."""
        te = has_transformer_engine() if kernels is None else kernels
        fused_ok = cuda and (has_fused_kernels() if kernels is None else kernels)
        impl = self.transformer_impl
        if impl == "auto":
            impl = "transformer_engine" if cuda and te else "local"
        elif impl == "transformer_engine" and not (cuda and te):
            raise ConfigError("performance.transformer_impl='transformer_engine' needs a GPU with "
                              "the transformer_engine package importable; use 'auto' or 'local' "
                              "(the device check benchmarks/train_throughput.py --suite runs TE)")
        dist_opt = dp > 1 if self.distributed_optimizer is None else self.distributed_optimizer
        overlap = (cuda and dp > 1) if self.overlap_grad_reduce is None else self.overlap_grad_reduce
        gather = (overlap and dist_opt) if self.overlap_param_gather is None \
            else self.overlap_param_gather
        if gather and not (dist_opt and overlap):
            raise ConfigError("performance.overlap_param_gather needs distributed_optimizer and "
                              "overlap_grad_reduce")
        seq_par = (tp > 1 and (arch == "gpt" or fused_ok)) \
            if self.sequence_parallel is None else self.sequence_parallel
        fused = fused_ok if self.fused_kernels is None else self.fused_kernels
        if fused and not fused_ok:
            raise ConfigError("performance.fused_kernels needs a GPU with TransformerEngine or "
                              "apex importable; use null (auto)")
        return dataclasses.replace(self, transformer_impl=impl, distributed_optimizer=dist_opt,
                                   overlap_grad_reduce=overlap, overlap_param_gather=gather,
                                   sequence_parallel=seq_par and tp > 1, fused_kernels=fused,
                                   recompute="none" if self.recompute == "auto" else self.recompute)


def has_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def has_fused_kernels() -> bool:
    """Whether TransformerEngine or NVIDIA apex (the CUDA one, with its fused layer norm) imports."""
    return has_transformer_engine() or (importlib.util.find_spec("apex") is not None
                                        and importlib.util.find_spec("apex.normalization") is not None)
