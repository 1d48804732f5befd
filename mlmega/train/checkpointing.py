"""Training checkpoints in Megatron-LM's torch format, saved atomically and resumed exactly.

Each (TP, PP) rank of DP replica 0 writes ``model_optim_rng.pt`` (model shard, optimizer, LR
scheduler, RNG states, consumed samples) into a hidden staging directory; after a barrier rank 0
renames the iteration directory into place and then rewrites the ``latest`` marker, so a crash at any
point leaves either the previous checkpoint or the new one, never half of one. With the distributed
optimizer, the DP-sharded parameter state (fp32 main weights, Adam moments) is gathered on DP rank
0 and written beside it as ``distrib_optim.pt``, as Megatron-LM does.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from mlmega.checkpoint.atomic import write_text_atomic
from mlmega.checkpoint.layout import ShardLayout
from mlmega.checkpoint.directory import TRACKER, iteration_dir_name, load_file
from mlmega.checkpoint.integrity import RecordChecks
from mlmega.checkpoint.torch_format import TorchCheckpoint, rank_file_path, shard_content
from mlmega.config.errors import CheckpointError

OPTIMIZER_SHARDS_FILE = "distrib_optim.pt"  # Megatron-LM's name, beside model_optim_rng.pt


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(_tuplify(state["python"]))
    if "tracker" in state:
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def save(save_dir: Path, layout: ShardLayout, iteration: int, model_state: dict,
         optimizer_state: Any, scheduler_state: dict, consumed_samples: int,
         tp_rank: int, pp_rank: int, dp_rank: int, extra_args: dict,
         optimizer_shards: Optional[dict] = None) -> None:
    """Collective: every rank calls it; DP replica 0 writes; rank 0 publishes.

    ``optimizer_shards``: the distributed optimizer's parameter state gathered on DP rank 0
    (``get_parameter_state_dp_zero``), or None."""
    staging = save_dir / f".staging-{iteration_dir_name(iteration)}"
    final = save_dir / iteration_dir_name(iteration)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    if dp_rank == 0:
        # The model is whole in memory: torch.save is as fast as the streaming writer here
        # (docs/performance-notes.md), and it is torch's own.
        path = rank_file_path(staging, layout, tp_rank, pp_rank, iteration)
        torch.save(shard_content(layout, pp_rank, model_state, iteration,
                                 extra_args={**extra_args, "consumed_train_samples": consumed_samples},
                                 optimizer=optimizer_state, opt_param_scheduler=scheduler_state,
                                 rng_state=rng_state(), num_floating_point_operations_so_far=0),
                   path)
        if optimizer_shards is not None:
            torch.save(optimizer_shards, path.parent / OPTIMIZER_SHARDS_FILE)
    dist.barrier()
    if rank == 0:
        if final.exists():  # re-saving an iteration (a resumed run that stopped again)
            shutil.rmtree(final)
        os.replace(staging / iteration_dir_name(iteration), final)
        shutil.rmtree(staging, ignore_errors=True)
        write_text_atomic(save_dir / TRACKER, str(iteration))  # the marker, last
    dist.barrier()


def latest(save_dir: Path) -> Optional[TorchCheckpoint]:
    """The checkpoint to resume from, or None when ``save_dir`` holds none yet."""
    if not (save_dir / TRACKER).exists():
        return None
    return TorchCheckpoint.open(save_dir)


def verify_rank_files(ckpt: TorchCheckpoint, tp_rank: int, pp_rank: int,
                      optimizer_shards: bool) -> None:
    """Check every record of the files a rank resumes from (its shard, and ``distrib_optim.pt``
    where ``optimizer_shards``) against their checksums: resuming reads them whole, unchecked.
    CheckpointError names the file and the damaged record."""
    path = ckpt.shard_path(tp_rank, pp_rank)
    ckpt.record_checks(tp_rank, pp_rank).check_all()
    if optimizer_shards and (path.parent / OPTIMIZER_SHARDS_FILE).is_file():
        RecordChecks(path.parent / OPTIMIZER_SHARDS_FILE).check_all()


def gather_optimizer_shards(optimizer) -> Any:
    """Collective over DP: the distributed optimizer's parameter state, gathered on DP rank 0 (None
    elsewhere), as Megatron-LM's ``distrib_optim.pt`` holds it (a list for chained optimizers)."""
    states = [opt.get_parameter_state_dp_zero() for opt in optimizer.chained_optimizers]
    return states[0] if len(states) == 1 else states


def load_optimizer_shards(optimizer, ckpt: TorchCheckpoint, tp_rank: int, pp_rank: int,
                          dp_rank: int) -> None:
    """Collective over DP: DP rank 0 reads ``distrib_optim.pt`` and scatters it into the shards."""
    states = None
    if dp_rank == 0:
        path = ckpt.shard_path(tp_rank, pp_rank).parent / OPTIMIZER_SHARDS_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: missing: the checkpoint was saved without the "
                                  f"distributed optimizer; resume with "
                                  f"performance.distributed_optimizer=false")
        states = load_file(path, mmap=False)
    chained = optimizer.chained_optimizers
    # no_grad: in fp32 the optimizer's main params are views of the model's (leaf) parameters,
    # which it copies into in place
    with torch.no_grad():
        for i, opt in enumerate(chained):
            with _step_state_set_aside(opt.optimizer):
                opt.load_parameter_state_from_dp_zero(
                    None if states is None else states if len(chained) == 1 else states[i])


@contextlib.contextmanager
def _step_state_set_aside(inner):
    """megatron-core 0.16.1 copies every per-parameter state key of the inner optimizer from the
    gathered file, which holds param / exp_avg / exp_avg_sq only; torch's Adam (used without TE or
    apex) also keeps ``step`` there: keep it out meanwhile. load_state_dict set it to one tensor
    shared by every parameter, which Adam would then advance once per parameter and step: each
    parameter gets its own copy back."""
    steps = {param: state.pop("step") for param, state in inner.state.items() if "step" in state}
    try:
        yield
    finally:
        for param, step in steps.items():
            inner.state[param]["step"] = step.clone()


def check_resumable(ckpt: TorchCheckpoint, layout: ShardLayout) -> None:
    have = ckpt.layout
    if (have.tp, have.pp, have.transformer_impl) != (layout.tp, layout.pp,
                                                     layout.transformer_impl) or \
            have.cfg != layout.cfg:
        model = have.cfg.differences(layout.cfg)
        spec = f", spec {have.transformer_impl} vs {layout.transformer_impl}" \
            if have.transformer_impl != layout.transformer_impl else ""
        raise CheckpointError(f"{ckpt.root}: cannot resume: it holds another model or layout "
                              f"than this stage trains (checkpoint vs stage): "
                              f"{model + ', ' if model else ''}TP={have.tp} vs {layout.tp}, "
                              f"PP={have.pp} vs {layout.pp}{spec} (use a fresh save_dir, or "
                              f"convert it)")
