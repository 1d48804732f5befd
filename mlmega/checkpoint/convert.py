"""Per-rank streaming conversion of sharded Megatron checkpoints: the worker pool.

Target ranks run in parallel worker processes (or as the tasks of one SLURM job), each writing its
own files into a staging directory (:mod:`mlmega.checkpoint.convert_tensors` makes the tensors, the
format's writer writes them); the coordinator finishes the format (torch_dist: merges the ranks'
index parts into ``.metadata``, writes ``common.pt`` and ``metadata.json``), writes the ``latest``
marker last and renames the staging directory into place.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mlmega.checkpoint.atomic import publish, staging_dir, write_text_atomic
from mlmega.checkpoint.convert_plan import ConversionPlan
from mlmega.checkpoint.convert_tensors import pp_stage_tensors
from mlmega.checkpoint.directory import TRACKER
from mlmega.checkpoint.formats import writer
from mlmega.checkpoint.layout import ShardLayout
from mlmega.checkpoint.streaming import reuse_freed_memory
from mlmega.config.errors import CheckpointError
from mlmega.parallel.parent_death import die_with_parent
from mlmega.progress import Progress, format_seconds


@dataclass(frozen=True)
class RankResult:
    tp_rank: int
    pp_rank: int
    tensors: int
    bytes: int
    seconds: float


def convert_ranks(plan: ConversionPlan, pp_rank: int, tp_ranks: Sequence[int],
                  staging: Path) -> list[RankResult]:
    """Write the checkpoint files of target ranks (tp, ``pp_rank``) for tp in ``tp_ranks`` into
    ``staging``, tensor by tensor (the format's :meth:`CheckpointWriter.write_pp_stage`)."""
    start = time.monotonic()
    target = plan.target
    names = [p.local_name for p in target.pp_stage_params(pp_rank)]
    label = ",".join(map(str, tp_ranks))
    progress = Progress(f"ranks tp{label} pp{pp_rank}", total=len(names) * len(tp_ranks),
                        unit="tensors", scale=1.0, every=5.0)
    nbytes = dict.fromkeys(tp_ranks, 0)

    def written(tp_rank: int, size: int) -> None:
        nbytes[tp_rank] += size
        progress.update(1)

    writer(plan.format).write_pp_stage(
        staging, target, pp_rank, tp_ranks, lambda ranks: pp_stage_tensors(plan, pp_rank, ranks),
        plan.iteration, plan.output_args, written, plan.checksums)
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


def run_locally(tasks: Sequence[ConversionTask], workers: int, log=print) -> list[RankResult]:
    """Run ``tasks`` in this process (workers <= 1) or in ``workers`` forked processes."""
    if workers <= 1:
        return convert_share(tasks)
    start, results = time.monotonic(), []
    # fork: workers start in milliseconds instead of re-importing torch; the parent has only
    # read checkpoint metadata, like a DataLoader's parent. Frozen objects are left out of the
    # workers' garbage collections, which would otherwise copy every page of the parent's
    # objects (docs/performance-notes.md).
    gc.freeze()
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context(),
                                 initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
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
        writer(plan.format).finish(staging, plan.target, plan.iteration,
                                   extra_args=plan.output_args)
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
