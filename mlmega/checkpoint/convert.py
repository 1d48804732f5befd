"""Per-rank streaming conversion of sharded Megatron checkpoints between layouts and levels.

To produce target rank (tp, pp) a worker reads only the source tensors it needs (lazily, from
mmapped shard files), one parameter at a time: gather over the source's TP ranks, apply the operator
(identity, coalesce, de-coalesce, de-coalesce + interpolate), split for the target TP rank. Target
ranks run in parallel worker processes (or as the tasks of one SLURM job), each writing its own file
into a staging directory; the coordinator writes the ``latest`` marker last and renames the
staging directory into place. Sources in either format (torch: ``mp_rank_*`` files; torch_dist:
megatron-core's distributed checkpoint) are detected; ``format="torch_dist"`` writes torch_dist
output: each target rank writes its own ``.distcp`` file and index part, and the coordinator
merges the parts into ``.metadata`` (plus ``common.pt``, ``metadata.json``) before the marker.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

import torch

from mlmega.checkpoint.atomic import check_destination, publish, staging_dir, write_text_atomic
from mlmega.checkpoint.dist_format import (finalize_dist, open_checkpoint, save_dist_full_state,
                                           write_dist_rank)
from mlmega.checkpoint.layout import ShardLayout
from mlmega.checkpoint.streaming import LazyTensor, return_freed_memory
from mlmega.checkpoint.torch_format import TRACKER, iteration_dir_name, write_rank_file
from mlmega.config.errors import ConfigError
from mlmega.operators import LevelMap, LevelSchemes, interpolate_tensor
from mlmega.progress import Progress, format_seconds

OPS = ("reshard", "coalesce", "decoalesce", "interpolate")
FORMATS = ("torch", "torch_dist")


@dataclass(frozen=True)
class ConversionPlan:
    """What to convert, validated before any tensor is read or written."""

    op: str
    src: Path
    dst: Optional[Path]
    target: ShardLayout
    iteration: int
    level: Optional[LevelMap] = None
    large: Optional[Path] = None  # interpolate: the large level's pre-coalescing checkpoint
    alpha: float = 0.5
    format: str = "torch"

    @property
    def ranks(self) -> list[tuple[int, int]]:
        return self.target.ranks


@dataclass(frozen=True)
class RankResult:
    tp_rank: int
    pp_rank: int
    tensors: int
    bytes: int
    seconds: float


def plan_conversion(op: str, src: str | Path, dst: Optional[str | Path], *, target_tp: Optional[int] = None,
                    target_pp: Optional[int] = None, schemes: Optional[LevelSchemes] = None,
                    large: Optional[str | Path] = None, alpha: Optional[float] = None,
                    fmt: str = "torch", overwrite: bool = False) -> ConversionPlan:
    """Open and validate the inputs and the target layout; raises ConfigError on bad input."""
    if op not in OPS:
        raise ConfigError(f"unknown conversion {op!r}; expected one of {OPS}")
    if fmt not in FORMATS:
        raise ConfigError(f"--format={fmt!r}: expected one of {FORMATS}")
    src = Path(src)
    if dst is not None:  # None: the tensors are consumed in memory (training's initial load)
        dst = Path(dst)
        check_destination(dst, overwrite)
    source = open_checkpoint(src)
    source.validate_tensors()
    layout = source.layout
    level = None
    if op != "reshard" and schemes is None:
        raise ConfigError(f"convert {op} needs a scheme (--scheme FILE or --width-factor/"
                          f"--depth-factor)")
    if op == "coalesce":
        level = LevelMap.from_large(layout.cfg, schemes)
        cfg = level.small
    elif op in ("decoalesce", "interpolate"):
        level = LevelMap.from_small(layout.cfg, schemes)
        cfg = level.large
    else:
        cfg = layout.cfg
    if op == "interpolate":
        if large is None:
            raise ConfigError("convert interpolate needs --large DIR (the large level's checkpoint "
                              "from before coalescing)")
        if alpha is None or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"--alpha={alpha!r}: expected a number in [0, 1]")
        large_ckpt = open_checkpoint(large)
        if large_ckpt.layout.cfg.replace(source="") != cfg.replace(source=""):
            raise ConfigError(f"{large}: its model {large_ckpt.layout.cfg.to_dict()} is not the "
                              f"de-coalesced model {cfg.to_dict()} of {src}")
        large_ckpt.validate_tensors()
        layout = large_ckpt.layout  # default target layout: the large level's own
    target = ShardLayout(cfg, target_tp or layout.tp, target_pp or layout.pp)
    return ConversionPlan(op, src, dst, target, source.iteration, level,
                          Path(large) if large else None, 0.5 if alpha is None else alpha, fmt)


class _Producer:
    """Full target tensors, computed from the source checkpoint(s) on demand."""

    def __init__(self, plan: ConversionPlan):
        self.plan = plan
        self.source = open_checkpoint(plan.src)
        self.large = open_checkpoint(plan.large) if plan.large else None

    def tensor(self, spec, layer, global_name) -> torch.Tensor:
        op, level = self.plan.op, self.plan.level
        if op == "reshard":
            return self.source.read(global_name)
        if op == "coalesce":
            return level.coalesced_param(spec, layer, self.source.read)
        decoalesced = level.decoalesced_param(spec, layer, self.source.read)
        if op == "decoalesce":
            return decoalesced
        return interpolate_tensor(self.large.read(global_name), decoalesced, self.plan.alpha)

    def shard(self, param, tp_rank: int) -> torch.Tensor:
        """Target TP rank ``tp_rank``'s shard of ``param`` (a LocalParam): fresh memory."""
        target, spec = self.plan.target, param.spec
        if self.plan.op == "interpolate":
            # elementwise, so interpolate this rank's shards rather than the full tensors and
            # split: the same values (split moves data and pads zeros), 1/TP of the float64 work
            decoalesced = self.plan.level.decoalesced_param(spec, param.layer, self.source.read)
            decoalesced = target.split(spec, decoalesced, tp_rank)
            large = target.split(spec, self.large.read(param.global_name), tp_rank)
            return interpolate_tensor(large, decoalesced, self.plan.alpha)
        full = self.tensor(spec, param.layer, param.global_name)
        if target.tp == 1 and tuple(full.shape) == target.local_shape(spec) \
                and full.is_contiguous() and self._fresh(full):
            return full  # already fresh memory in the target's shape: splitting only copies it
        return target.split(spec, full, tp_rank)

    def _fresh(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is not (a view of) source data: source data must not be yielded, as
        release_pages drops its pages and a consumer must be free to modify what it gets."""
        return not any(getattr(ckpt, "shares_read_memory", lambda t: True)(tensor)
                       for ckpt in (self.source, self.large) if ckpt is not None)

    def release_pages(self) -> None:
        """Drop the resident mmapped source pages read so far (see TorchCheckpoint.release_pages)."""
        self.source.release_pages()
        if self.large is not None:
            self.large.release_pages()


def rank_tensors(plan: ConversionPlan, tp_rank: int, pp_rank: int):
    """Yield (local name, tensor) for every tensor target rank (tp_rank, pp_rank) holds, one at a
    time: what conversion writes and what training loads when it starts from another level.

    Each yielded tensor is fresh memory that the generator does not keep: once the consumer drops
    it, it is freed. Asking for the next one also releases the source pages read for the previous.
    """
    producer = _Producer(plan)
    for param in plan.target.stage_params(pp_rank):
        out = [producer.shard(param, tp_rank)]
        yield param.local_name, out.pop()  # hold no tensor while suspended at the yield
        producer.release_pages()  # the consumer is done with the previous tensor


def convert_rank(plan: ConversionPlan, tp_rank: int, pp_rank: int, staging: Path) -> RankResult:
    """Write target rank (tp_rank, pp_rank)'s shard file into ``staging``, tensor by tensor.

    The file is streamed (torch_format.write_rank_file with lazy tensors): each tensor is produced
    when the writer reaches it, written and freed, so memory stays at a few tensors, not the shard.
    """
    start = time.monotonic()
    target = plan.target
    names = [p.local_name for p in target.stage_params(pp_rank)]
    progress = Progress(f"rank tp{tp_rank} pp{pp_rank}", total=len(names), unit="tensors",
                        scale=1.0, every=5.0)
    tensors = rank_tensors(plan, tp_rank, pp_rank)
    nbytes = 0

    def produce(expected: str):
        def next_tensor() -> torch.Tensor:
            nonlocal nbytes
            name, shard = next(tensors)
            assert name == expected, (name, expected)  # the writer walks the model in order
            nbytes += shard.numel() * shard.element_size()
            progress.update(1)
            return shard
        return next_tensor

    model = {name: LazyTensor(produce(name)) for name in names}
    if plan.format == "torch_dist":
        write_dist_rank(staging / iteration_dir_name(plan.iteration), target, tp_rank, pp_rank,
                        model)
    else:
        write_rank_file(staging, target, tp_rank, pp_rank, model, plan.iteration,
                        extra_args={"mlmega_converted_by": plan.op})
    next(tensors, None)  # finish the generator (releases the last source pages)
    return RankResult(tp_rank, pp_rank, len(names), nbytes, time.monotonic() - start)


def _convert_rank_task(args) -> RankResult:
    torch.set_num_threads(1)
    return_freed_memory()  # freed tensors leave RSS at once (streaming keeps few alive)
    return convert_rank(*args)


def run_conversion(plan: ConversionPlan, workers: int = 1, overwrite: bool = False,
                   log=print) -> dict:
    """Convert every target rank (``workers`` processes), then publish atomically; a summary dict."""
    start = time.monotonic()
    staging = staging_dir(plan.dst)
    tasks = [(plan, t, p, staging) for t, p in plan.ranks]
    results: list[RankResult] = []
    try:
        if workers <= 1:
            results = [_convert_rank_task(task) for task in tasks]
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                for result in pool.map(_convert_rank_task, tasks):
                    results.append(result)
                    done = len(results)
                    elapsed = time.monotonic() - start
                    log(f"convert: {done}/{len(tasks)} ranks, "
                        f"ETA {format_seconds(elapsed / done * (len(tasks) - done))}")
        if plan.format == "torch_dist":  # merge the ranks' index parts; common.pt, metadata.json
            finalize_dist(staging / iteration_dir_name(plan.iteration), plan.target,
                          plan.iteration, extra_args={"mlmega_converted_by": plan.op})
        write_text_atomic(staging / TRACKER, str(plan.iteration))  # the marker, last
        publish(staging, plan.dst, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.monotonic() - start
    nbytes = sum(r.bytes for r in results)
    summary = dict(op=plan.op, dst=str(plan.dst), tp=plan.target.tp, pp=plan.target.pp,
                   ranks=len(results), tensors=sum(r.tensors for r in results),
                   gigabytes=nbytes / 1e9, seconds=seconds, gb_per_s=nbytes / 1e9 / seconds)
    log(f"convert {plan.op}: {summary['tensors']} tensors, {summary['gigabytes']:.3f} GB in "
        f"{seconds:.2f} s ({summary['gb_per_s']:.2f} GB/s) -> {plan.dst} "
        f"(TP={plan.target.tp}, PP={plan.target.pp})")
    return summary


def save_full_state(state: dict[str, torch.Tensor], layout: ShardLayout, dst: str | Path,
                    iteration: int = 0, overwrite: bool = False, fmt: str = "torch") -> None:
    """Write a full (TP=1 canonical) state dict as a checkpoint (``fmt``) saved at ``layout``."""
    from mlmega.checkpoint.atomic import atomic_directory

    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: expected one of {FORMATS}")
    if fmt == "torch_dist":
        return save_dist_full_state(state, layout, dst, iteration, overwrite)

    with atomic_directory(dst, overwrite) as staging:
        for tp_rank, pp_rank in layout.ranks:
            model = {p.local_name: layout.split(p.spec, state[p.global_name], tp_rank)
                     for p in layout.stage_params(pp_rank)}
            write_rank_file(staging, layout, tp_rank, pp_rank, model, iteration)
        write_text_atomic(staging / TRACKER, str(iteration))


def load_full_state(src: str | Path) -> tuple[dict[str, torch.Tensor], ShardLayout]:
    """Read a whole checkpoint (either format) into a full (TP=1 canonical) state dict."""
    from mlmega.models.params import iter_params

    ckpt = open_checkpoint(src)
    ckpt.validate_tensors()
    state = {name: ckpt.read(name).clone() for name, _, _ in iter_params(ckpt.layout.cfg)}
    return state, ckpt.layout
