"""Run a function on N gloo ranks (real torch.distributed + megatron parallel state) in subprocesses."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from mlmega.parallel.setup import free_port


def _entry(rank: int, world: int, port: int, tp: int, pp: int, job: bytes, out_dir: str) -> None:
    from mlmega.models import lazy_compile
    from mlmega.parallel.setup import init_model_parallel, init_process_group, teardown

    lazy_compile.install()  # before unpickling the job (its module) imports megatron-core
    fn, args = pickle.loads(job)
    torch.set_num_threads(1)
    init_process_group(rank, world, "127.0.0.1", port)
    if tp:
        init_model_parallel(tp, pp)
    try:
        result = fn(*args)
        with open(Path(out_dir) / f"{rank}.pkl", "wb") as fh:
            pickle.dump(result, fh)
    finally:
        teardown()


def run_ranks(fn: Callable, tp: int, pp: int, *args: Any, dp: int = 1) -> list[Any]:
    """``fn(*args)`` on every rank of a TP x PP x DP gloo job; returns each rank's result.

    With tp=0 the parallel state is left to ``fn`` (world size ``pp * dp``)."""
    world = max(tp, 1) * pp * dp
    with tempfile.TemporaryDirectory() as out_dir:
        job = pickle.dumps((fn, args))
        mp.spawn(_entry, args=(world, free_port(), tp, pp, job, out_dir), nprocs=world)
        results = []
        for rank in range(world):
            with open(Path(out_dir) / f"{rank}.pkl", "rb") as fh:
                results.append(pickle.load(fh))
    return results


def sharded_logits(cfg, state_by_rank, ids: torch.Tensor):
    """Forward this rank's model shard (loaded strictly from ``state_by_rank[(tp, pp)]``) and return
    the full-vocab logits on the last stage's TP rank 0 (None elsewhere). Runs inside run_ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mlmega.models.build import build_model

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    t, p = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    model = build_model(cfg, tp, pp, pre_process=p == 0, post_process=p == pp - 1)
    model.load_state_dict(state_by_rank[(t, p)], strict=True)
    model.eval()
    b, s = ids.shape
    with torch.no_grad():
        if p > 0:
            hidden = torch.empty(s, b, cfg.hidden_size)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = forward(model, cfg, ids)
        if p < pp - 1:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)[..., : cfg.vocab_size]
    return logits if t == 0 and ps.get_data_parallel_rank() == 0 else None


def logits_of_checkpoints(roots: list, ids: torch.Tensor) -> list:
    """For each torch-format checkpoint, the logits its models compute at the checkpoint's own
    TP/PP layout (data parallel fills the rest of the world). Runs inside run_ranks(tp=0)."""
    from mlmega.checkpoint.torch_format import TorchCheckpoint
    from mlmega.parallel.setup import init_model_parallel

    found = []
    for root in roots:
        ckpt = TorchCheckpoint.open(root)
        layout = ckpt.layout
        init_model_parallel(layout.tp, layout.pp)
        states = {(t, p): dict(ckpt.model_state(t, p)) for t, p in layout.ranks}
        found.append(sharded_logits(layout.cfg, states, ids))
    return found


def checkpoint_logits(roots: list, ids: torch.Tensor, world: int = 4) -> list[torch.Tensor]:
    """Logits of each checkpoint in ``roots``, all computed in one spawned ``world``-rank job."""
    results = run_ranks(logits_of_checkpoints, 0, world, roots, ids)
    return [next(r[i] for r in results if r[i] is not None) for i in range(len(roots))]


def forward(model, cfg, ids: torch.Tensor) -> torch.Tensor:
    """Logits (last stage) or hidden states (other stages) of a GPT or BERT model shard."""
    if cfg.arch == "gpt":
        positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        return model(ids, positions, attention_mask=None)
    out = model(ids, torch.ones_like(ids, dtype=torch.bool), tokentype_ids=torch.zeros_like(ids))
    return out[0] if isinstance(out, tuple) else out
