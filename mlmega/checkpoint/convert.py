"""Per-rank streaming conversion of sharded Megatron checkpoints between layouts and levels.

To produce target rank (tp, pp) a worker reads only the source tensors it needs (with pread from
the shard files, whose metadata is loaded lazily), one parameter at a time: gather over the
source's TP ranks, apply the operator (identity, coalesce, de-coalesce, de-coalesce +
interpolate), split for the target TP rank; the tensors TP splits on the vocabulary (embeddings,
output layer) go block by block of rows, from the source's rows into the target file's record.
Target ranks run in parallel worker processes (or as the tasks of one SLURM job), each writing its
own file into a staging directory; the coordinator writes the ``latest`` marker last and renames
the staging directory into place. Sources in either format (torch: ``mp_rank_*`` files;
torch_dist: megatron-core's distributed checkpoint) are detected; ``format="torch_dist"`` writes
torch_dist output: each target rank writes its own ``.distcp`` file and index part, and the
coordinator merges the parts into ``.metadata`` (plus ``common.pt``, ``metadata.json``) before
the marker.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mlmega.checkpoint.atomic import check_destination, publish, staging_dir, write_text_atomic
from mlmega.checkpoint.dist_format import (finalize_dist, open_checkpoint, save_dist_full_state,
                                           write_dist_rank)
from mlmega.checkpoint.errors import CheckpointError
from mlmega.checkpoint.layout import ShardLayout, tokenizer_args
from mlmega.checkpoint.streaming import (LazyTensor, RowBlocks, StreamingWriter,
                                           reuse_freed_memory)
from mlmega.checkpoint.torch_format import (TRACKER, TorchCheckpoint, iteration_dir_name,
                                           rank_file_path, shard_content, write_rank_file)
from mlmega.config.errors import ConfigError
from mlmega.operators import LevelMap, LevelSchemes, interpolate_tensor
from mlmega.progress import Progress, format_seconds

OPS = ("reshard", "coalesce", "decoalesce", "interpolate")
FORMATS = ("torch", "torch_dist")
_ROWS_PER_BLOCK = 1024  # embeddings are read and mapped this many rows at a time


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
    checksums: bool = False  # zip CRC32 per record (torch format): torch.load never checks them
    vocab_size: Optional[int] = None  # the source's true vocabulary, resolved once (workers reopen)
    vocab_source: str = ""  # where vocab_size came from
    source_args: Optional[dict] = None  # Megatron args carried to the output (the tokenizer's)
    verify: bool = True  # check the sources' record checksums before reading (--no-verify)
    check_finite: bool = False  # refuse source tensors holding NaN/Inf (--check-finite)

    @property
    def ranks(self) -> list[tuple[int, int]]:
        return self.target.ranks

    @property
    def output_args(self) -> dict:
        """Args the output's files hold besides its layout's (:meth:`ShardLayout.megatron_args`)."""
        return {**(self.source_args or {}), "mlmega_converted_by": self.op}

    @property
    def sources(self) -> list[Path]:
        """The checkpoints read (which the destination must not overlap)."""
        return [self.src] + ([self.large] if self.large else [])


@dataclass(frozen=True)
class RankResult:
    tp_rank: int
    pp_rank: int
    tensors: int
    bytes: int
    seconds: float


def plan_conversion(op: str, src: str | Path, dst: Optional[str | Path], *, target_tp: Optional[int] = None,
                    target_pp: Optional[int] = None,
                    target_layers: Optional[Sequence[int]] = None,
                    schemes: Optional[LevelSchemes] = None,
                    large: Optional[str | Path] = None, alpha: Optional[float] = None,
                    fmt: str = "torch", overwrite: bool = False, checksums: bool = False,
                    vocab_size: Optional[int] = None,
                    tokenizer: Optional[str | Path] = None, verify: bool = True,
                    check_finite: bool = False,
                    target_impl: Optional[str] = None) -> ConversionPlan:
    """Open and validate the inputs and the target layout; raises ConfigError on bad input.

    ``target_layers``: the layers of each output pipeline stage (an uneven split).
    ``vocab_size`` / ``tokenizer``: the source's true vocabulary where its args lack it
    (:func:`mlmega.checkpoint.vocab.true_vocab_size`). The target's vocabulary is padded by
    Megatron-LM's rule for its TP size (rows past the source's padding are zero).
    ``verify``: check records' checksums; ``check_finite``: refuse NaN/Inf source tensors.
    ``target_impl``: the layer spec whose parameter names the target uses (local or
    transformer_engine; default: the source's)."""
    if op not in OPS:
        raise ConfigError(f"unknown conversion {op!r}; expected one of {OPS}")
    if fmt not in FORMATS:
        raise ConfigError(f"--format={fmt!r}: expected one of {FORMATS}")
    src = Path(src)
    if dst is not None:  # None: the tensors are consumed in memory (training's initial load)
        dst = Path(dst)
        check_destination(dst, overwrite, [src] + ([Path(large)] if large else []))
    source = open_checkpoint(src, vocab_size=vocab_size, tokenizer=tokenizer, verify=verify,
                             check_finite=check_finite)
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
        large_ckpt = open_checkpoint(large, vocab_size=cfg.vocab_size)
        if large_ckpt.layout.cfg != cfg:
            raise ConfigError(f"--large {large}: its model is not --src {src} de-coalesced "
                              f"(--large vs de-coalesced --src): "
                              f"{large_ckpt.layout.cfg.differences(cfg)}")
        large_ckpt.validate_tensors()
        layout = large_ckpt.layout  # default target layout: the large level's own
    if target_layers is not None:
        if target_pp is not None and target_pp != len(target_layers):
            raise ConfigError(f"--target-pp={target_pp} and --target-pp-layers="
                              f"{','.join(map(str, target_layers))}: expected "
                              f"{len(target_layers)} stages in both")
        target_pp, target_layers = len(target_layers), tuple(target_layers)
    target = ShardLayout(cfg, target_tp or layout.tp, target_pp or layout.pp, target_layers,
                         transformer_impl=target_impl or layout.transformer_impl)
    same = (target.tp, target.layers_per_stage, target.padded_vocab, target.transformer_impl) == \
        (layout.tp, layout.layers_per_stage, layout.padded_vocab, layout.transformer_impl)
    if op == "reshard" and dst is not None and fmt == source.FORMAT and same:
        raise ConfigError(f"convert reshard: --src {src} is already TP={layout.tp}, "
                          f"PP={layout.pp} (layers per stage "
                          f"{','.join(map(str, layout.layers_per_stage))}) in format {fmt}; give "
                          f"another --target-tp, --target-pp, --target-pp-layers or --format")
    return ConversionPlan(op, src, dst, target, source.iteration, level,
                          Path(large) if large else None, 0.5 if alpha is None else alpha, fmt,
                          checksums, source.layout.cfg.vocab_size, source.vocab_source,
                          tokenizer_args(source.args), verify, check_finite)


class _Producer:
    """Full target tensors, computed from the source checkpoint(s) on demand."""

    def __init__(self, plan: ConversionPlan):
        self.plan = plan
        checks = dict(verify=plan.verify, check_finite=plan.check_finite,
                      vocab_size=plan.vocab_size)
        self.source = open_checkpoint(plan.src, **checks)
        self.large = open_checkpoint(plan.large, **checks) if plan.large else None
        self._last_read: tuple[str, Optional[torch.Tensor]] = ("", None)

    def mapped(self, param) -> torch.Tensor:
        """The full tensor of ``param`` after the level operator (de-coalesced, for interpolate)."""
        op, level = self.plan.op, self.plan.level
        if op == "reshard":
            return self.source.read(param.global_name)
        if op == "coalesce":
            return level.coalesced_param(param.spec, param.layer, self.source.read)
        read = self.source.read if param.layer is None else self._read_kept
        return level.decoalesced_param(param.spec, param.layer, read)

    @staticmethod
    def _rows(ckpt, name: str) -> Callable[[int, int], torch.Tensor]:
        """(start, count) -> those rows of checkpoint ``ckpt``'s canonical tensor ``name``: read
        from the shard files (torch format), else narrowed from the whole tensor read now."""
        if isinstance(ckpt, TorchCheckpoint):
            return functools.partial(ckpt.read_rows, name)
        whole = ckpt.read(name)
        return lambda start, count: whole.narrow(0, start, count)

    def _read_kept(self, name: str) -> torch.Tensor:
        """The source's tensor ``name``, the last one read kept: the large layers a depth group
        copies come one after another (parameters go layer-minor), and interpolation visits a
        tensor once per target TP rank, all reading the same small tensor. Nothing modifies
        what it returns (the mix writes into the large shards). Not for the embeddings: it would
        hold the largest tensor while the next ones are made."""
        if self._last_read[0] != name:
            self._last_read = ("", None)  # let the previous tensor go before reading
            self._last_read = (name, self.source.read(name))
        return self._last_read[1]

    def shards(self, param, tp_ranks: Sequence[int]) -> list[torch.Tensor | RowBlocks]:
        """Target TP ranks ``tp_ranks``' shards of ``param`` (a LocalParam), each fresh memory (or
        row blocks, see :meth:`_row_blocks`); the full tensor is gathered and mapped once for all
        of them (interpolation: see :meth:`_interpolated`)."""
        if param.layer is None and _vocab_split(param.spec):
            return self._row_blocks(param, tp_ranks)
        if self.plan.op == "interpolate":
            return self._interpolated(param, tp_ranks)
        target, spec = self.plan.target, param.spec
        full = self.mapped(param)
        if target.tp == 1 and tuple(full.shape) == target.local_shape(spec) \
                and full.is_contiguous():
            return [full]  # fresh memory in the target's shape already: splitting only copies it
        return [target.split(spec, full, r) for r in tp_ranks]

    def _row_blocks(self, param, tp_ranks: Sequence[int]) -> list[RowBlocks]:
        """Shards of a tensor TP splits on the vocab (word embeddings, output layer), as blocks of
        rows made when the writer takes them: the operators map rows independently (width maps
        act on the hidden dim), so neither the source's nor the target's whole tensor is made.
        Rows past the vocabulary are zero padding."""
        op, level, target, spec = self.plan.op, self.plan.level, self.plan.target, param.spec
        rows = self._rows(self.source, param.global_name)
        large_rows = self._rows(self.large, param.global_name) if op == "interpolate" else None

        def mapped(start: int, count: int) -> torch.Tensor:
            block = rows(start, count)
            if op == "reshard":
                return block
            if op == "coalesce":
                return level.coalesce_tensor(spec, block)
            view = level.decoalesce_broadcast(spec, block) if op == "interpolate" else None
            decoalesced = level.decoalesce_tensor(spec, block) if view is None else view
            if op == "decoalesce":
                return decoalesced
            large = large_rows(start, count)  # fresh memory: mixed in place
            self._mix(large, decoalesced)
            return large

        shape, dtype = target.local_shape(spec), mapped(0, 0).dtype

        def blocks(tp_rank: int):
            start, _, keep = target.vocab_rows(tp_rank)
            for row in range(0, keep, _ROWS_PER_BLOCK):
                yield mapped(start + row, min(_ROWS_PER_BLOCK, keep - row))
            if keep < shape[0]:
                yield torch.zeros((shape[0] - keep, *shape[1:]), dtype=dtype)

        return [RowBlocks(shape, dtype, functools.partial(blocks, r)) for r in tp_ranks]

    def _interpolated(self, param, tp_ranks: Sequence[int]) -> list[torch.Tensor]:
        """interpolate is elementwise: each large shard (fresh memory of its own) takes the mix
        of its elements in place, which are the same values as mixing the full tensors and
        splitting (split moves data and pads zeros, and zeros mix to zeros).

        Where de-coalescing is a broadcast (regular schemes), each shard is mixed from a
        broadcast view of the small tensor restricted to the shard's elements, and no large
        de-coalesced tensor is made. Otherwise the de-coalesced full tensor is made once and
        split."""
        target, spec = self.plan.target, param.spec
        full, out = None, []
        for r, large in zip(tp_ranks, self._large_shards(param, tp_ranks)):
            view = None if full is not None else self._decoalesced_view(param, r)
            if view is not None:
                self._mix(large, view)
            else:
                full = self.mapped(param) if full is None else full
                interpolate_tensor(large, target.shard_of(spec, full, r), self.plan.alpha,
                                   out=large)
            out.append(large)
        return out

    def _decoalesced_view(self, param, tp_rank: int) -> Optional[torch.Tensor]:
        """Target rank ``tp_rank``'s shard of ``param`` de-coalesced, as a broadcast view (TP
        splits a width dim by units), or None where de-coalescing is not one broadcast."""
        spec, target = param.spec, self.plan.target
        block = None
        if spec.tp_dim is not None:
            units = target.cfg.num_query_groups // target.tp
            block = (spec.tp_dim, tp_rank * units, units)
        return self.plan.level.decoalesced_view(spec, param.layer, self._read_kept, block)

    def _mix(self, large: torch.Tensor, decoalesced: torch.Tensor) -> None:
        """Mix contiguous ``large`` in place with ``decoalesced`` (a broadcast view of the same
        elements, in ``large``'s reshape to its shape)."""
        region = large.view(decoalesced.shape)
        interpolate_tensor(region, decoalesced, self.plan.alpha, out=region)

    def _large_shards(self, param, tp_ranks: Sequence[int]):
        """The large checkpoint's shards of ``param`` for ``tp_ranks``, one at a time, each in fresh
        contiguous memory: read as stored when it is stored at the target layout (no gather),
        else split from the gathered tensor."""
        target, large = self.plan.target, self.large
        same = (isinstance(large, TorchCheckpoint) and large.layout.tp == target.tp
                and large.layout.layers_per_stage == target.layers_per_stage)
        full = None if same else large.read(param.global_name)
        for r in tp_ranks:
            yield large.read_shard(param.global_name, r) if same else \
                target.split(param.spec, full, r)


def _vocab_split(spec) -> bool:
    """Whether TP splits ``spec`` on the vocab (dim 0 of the embeddings and the output layer)."""
    return spec.tp_dim == 0 and spec.dims[0] == "vocab"


def stage_tensors(plan: ConversionPlan, pp_rank: int, tp_ranks: Sequence[int]):
    """Yield (local name, [shard per rank of ``tp_ranks``]) for every tensor of target stage
    ``pp_rank``, one parameter at a time.

    Each yielded list holds fresh memory that the generator does not keep: once the consumer drops
    it, it is freed. Shards may be :class:`RowBlocks`, whose blocks are made (from the source
    checkpoints, which allow this from another thread) when the consumer iterates them.
    """
    producer = _Producer(plan)
    for param in plan.target.stage_params(pp_rank):
        out = [producer.shards(param, tp_ranks)]
        yield param.local_name, out.pop()  # hold no tensor while suspended at the yield


def rank_tensors(plan: ConversionPlan, tp_rank: int, pp_rank: int):
    """Yield (local name, tensor) for every tensor target rank (tp_rank, pp_rank) holds, one at a
    time (see :func:`stage_tensors`): what training loads when it starts from another level."""
    for name, shards in stage_tensors(plan, pp_rank, [tp_rank]):
        shard = shards.pop()
        yield name, shard.materialize() if isinstance(shard, RowBlocks) else shard


def convert_ranks(plan: ConversionPlan, pp_rank: int, tp_ranks: Sequence[int],
                  staging: Path) -> list[RankResult]:
    """Write the shard files of target ranks (tp, ``pp_rank``) for tp in ``tp_ranks`` into
    ``staging``, tensor by tensor.

    Torch format: the ranks' files are written side by side (one StreamingWriter each), so every
    full tensor is gathered and mapped once for all of them and memory stays at a parameter's full
    tensor plus its shards. torch_dist: rank by rank (write_dist_rank with lazy tensors).
    """
    start = time.monotonic()
    target = plan.target
    names = [p.local_name for p in target.stage_params(pp_rank)]
    label = ",".join(map(str, tp_ranks))
    progress = Progress(f"ranks tp{label} pp{pp_rank}", total=len(names) * len(tp_ranks),
                        unit="tensors", scale=1.0, every=5.0)
    nbytes = dict.fromkeys(tp_ranks, 0)
    if plan.format == "torch_dist":
        for tp_rank in tp_ranks:
            tensors = rank_tensors(plan, tp_rank, pp_rank)

            def produce(expected: str, tp_rank=tp_rank, tensors=tensors):
                def next_tensor() -> torch.Tensor:
                    name, shard = next(tensors)
                    assert name == expected, (name, expected)  # the writer walks in order
                    nbytes[tp_rank] += shard.numel() * shard.element_size()
                    progress.update(1)
                    return shard
                return next_tensor

            write_dist_rank(staging / iteration_dir_name(plan.iteration), target, tp_rank,
                            pp_rank, {name: LazyTensor(produce(name)) for name in names})
            next(tensors, None)  # run the generator to its end
    else:
        paths = {r: rank_file_path(staging, target, r, pp_rank, plan.iteration) for r in tp_ranks}
        written: dict[int, dict] = {r: {} for r in tp_ranks}

        def write(name: str, shards: list[torch.Tensor]) -> None:
            for r in tp_ranks:
                shard = shards.pop(0)
                written[r][name] = writers[r].write_tensor(shard, remember=False)
                nbytes[r] += shard.nbytes
                del shard
                progress.update(1)

        # One parameter is written (a thread: the writer's os.write releases the GIL) while the
        # next is gathered and mapped: at most two parameters' shards are alive.
        with ExitStack() as stack, ThreadPoolExecutor(max_workers=1) as io:
            writers = {r: stack.enter_context(StreamingWriter(paths[r], checksums=plan.checksums))
                       for r in tp_ranks}
            pending = None
            for name, shards in stage_tensors(plan, pp_rank, tp_ranks):
                if pending is not None:
                    pending.result()
                pending = io.submit(write, name, shards)
                del shards
            if pending is not None:
                pending.result()
            for r in tp_ranks:
                writers[r].finish(shard_content(target, pp_rank, written[r], plan.iteration,
                                                plan.output_args))
    seconds = time.monotonic() - start
    return [RankResult(r, pp_rank, len(names), nbytes[r], seconds) for r in tp_ranks]


ConversionTask = tuple  # (plan, pp_rank, tp_ranks, staging): the arguments of convert_ranks


def convert_share(tasks: Sequence[ConversionTask]) -> list[RankResult]:
    """Run ``tasks`` one after the other in this process (one worker's or SLURM task's share)."""
    return [r for task in tasks for r in convert_task(task)]


def convert_task(task: ConversionTask) -> list[RankResult]:
    """One task (:func:`convert_ranks`) as a conversion process runs it: one thread, freed
    memory reused."""
    torch.set_num_threads(1)
    reuse_freed_memory()  # the next tensors reuse freed ones' memory (no page faults)
    return convert_ranks(*task)


def conversion_tasks(target: ShardLayout, workers: int) -> list[tuple[int, tuple[int, ...]]]:
    """(pp_rank, tp_ranks) per task: a stage's TP ranks together (each full tensor is mapped once
    per task), split into as many parts as it takes to give ``workers`` processes work."""
    parts = min(target.tp, max(1, -(-workers // target.pp)))
    per_part = -(-target.tp // parts)
    return [(pp, tuple(range(t, min(t + per_part, target.tp))))
            for pp in range(target.pp) for t in range(0, target.tp, per_part)]


def _worker_context():
    return get_context("fork" if "fork" in get_all_start_methods() else "spawn")


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Worker initializer: the kernel kills this worker when its coordinator dies (even by
    SIGKILL, which runs no cleanup), so no orphan goes on converting."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def run_locally(tasks: Sequence[ConversionTask], workers: int, log=print) -> list[RankResult]:
    """Run ``tasks`` in this process (workers <= 1) or in ``workers`` forked processes."""
    if workers <= 1:
        return convert_share(tasks)
    start, results = time.monotonic(), []
    # fork: workers start in milliseconds instead of re-importing torch (2-3 s each); the
    # parent has only read checkpoint metadata, like a DataLoader's parent. Frozen objects are
    # left out of the workers' garbage collections, which would otherwise write to (and so
    # copy) every page of the parent's objects: measured, 29k page faults, 9% of interpolate.
    gc.freeze()
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context(),
                                 initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
            for done, task_results in enumerate(pool.map(convert_task, tasks), 1):
                results.extend(task_results)
                elapsed = time.monotonic() - start
                log(f"convert: {done}/{len(tasks)} tasks, "
                    f"ETA {format_seconds(elapsed / done * (len(tasks) - done))}")
    finally:
        gc.unfreeze()
    return results


def run_conversion(plan: ConversionPlan, workers: int = 1, overwrite: bool = False,
                   log=print, runner: Optional[Callable] = None) -> dict:
    """Convert every target rank, then publish atomically; returns a summary dict.

    The ranks are cut into tasks for ``workers`` processes (:func:`conversion_tasks`); ``runner``
    (tasks, log) -> results runs them elsewhere, e.g. as the tasks of one SLURM job
    (mlmega.launch.conversion_job); by default :func:`run_locally`.
    """
    start = time.monotonic()
    if plan.vocab_source:
        log(f"convert {plan.op}: vocabulary {plan.vocab_size} (from {plan.vocab_source}), padded "
            f"to {plan.target.padded_vocab} rows for TP={plan.target.tp}")
    staging = staging_dir(plan.dst)
    tasks = [(plan, pp, tp_ranks, staging) for pp, tp_ranks in conversion_tasks(plan.target,
                                                                                 workers)]
    results: list[RankResult] = []
    try:
        results = runner(tasks, log) if runner else run_locally(tasks, workers, log)
        if plan.format == "torch_dist":  # merge the ranks' index parts; common.pt, metadata.json
            finalize_dist(staging / iteration_dir_name(plan.iteration), plan.target,
                          plan.iteration, extra_args=plan.output_args)
        write_text_atomic(staging / TRACKER, str(plan.iteration))  # the marker, last
        publish(staging, plan.dst, overwrite, plan.sources)
    except CheckpointError as err:  # a damaged source, a full disk: one line
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"{err}; nothing was published to {plan.dst}") from None
    except OSError as err:  # a write outside the writers (a directory, a rename)
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"{err.filename or staging}: cannot write ({err.strerror or err}); "
                              f"nothing was published to {plan.dst}") from None
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


def load_full_state(src: str | Path, vocab_size: Optional[int] = None
                    ) -> tuple[dict[str, torch.Tensor], ShardLayout]:
    """Read a whole checkpoint (either format) into a full (TP=1 canonical) state dict."""
    from mlmega.models.params import iter_params

    ckpt = open_checkpoint(src, vocab_size=vocab_size)
    ckpt.validate_tensors()
    state = {name: ckpt.read(name).clone() for name, _, _ in iter_params(ckpt.layout.cfg)}
    return state, ckpt.layout
