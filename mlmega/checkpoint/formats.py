"""Both Megatron checkpoint formats behind one reader and one writer interface: ``torch``
(``mp_rank_*/model_optim_rng.pt`` files) and ``torch_dist`` (megatron-core's distributed
checkpoint), told apart by the iteration directory's content."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from mlmega.checkpoint.atomic import atomic_directory, write_text_atomic
from mlmega.checkpoint.directory import TRACKER, latest_directory
from mlmega.checkpoint.dist_format import DistCheckpoint, DistWriter, is_dist_directory
from mlmega.checkpoint.interface import CheckpointReader, CheckpointWriter
from mlmega.checkpoint.layout import ShardLayout
from mlmega.checkpoint.torch_format import TorchCheckpoint, TorchWriter
from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig
from mlmega.models.params import iter_params

WRITERS: dict[str, CheckpointWriter] = {w.name: w for w in (TorchWriter(), DistWriter())}
FORMATS = tuple(WRITERS)


def open_checkpoint(root: str | Path, arch: Optional[str] = None,
                    cfg: Optional[ModelConfig] = None, vocab_size: Optional[int] = None,
                    tokenizer: Optional[str | Path] = None, verify: bool = True,
                    check_finite: bool = False) -> CheckpointReader:
    """Open a Megatron checkpoint in either format (told apart by its iteration directory);
    ``vocab_size`` / ``tokenizer``: see :meth:`TorchCheckpoint.open`; ``verify``: check records'
    checksums before reading them; ``check_finite``: refuse NaN/Inf."""
    root = Path(root)
    _, _, directory = latest_directory(root)
    reader = DistCheckpoint if is_dist_directory(directory) else TorchCheckpoint
    return reader.open(root, arch=arch, cfg=cfg, vocab_size=vocab_size, tokenizer=tokenizer,
                       verify=verify, check_finite=check_finite)


def writer(fmt: str) -> CheckpointWriter:
    if fmt not in WRITERS:
        raise ConfigError(f"format={fmt!r}: expected one of {FORMATS}")
    return WRITERS[fmt]


def save_full_state(state: dict[str, torch.Tensor], layout: ShardLayout, dst: str | Path,
                    iteration: int = 0, overwrite: bool = False, fmt: str = "torch") -> None:
    """Write a full (TP=1 canonical) state dict as a checkpoint (``fmt``) saved at ``layout``
    (atomically: staged, the tracker written last, then renamed into place)."""
    out = writer(fmt)
    with atomic_directory(dst, overwrite) as staging:
        for tp_rank, pp_rank in layout.ranks:
            model = {p.local_name: layout.split(p.spec, state[p.global_name], tp_rank)
                     for p in layout.pp_stage_params(pp_rank)}
            out.write_rank(staging, layout, tp_rank, pp_rank, model, iteration)
        out.finish(staging, layout, iteration)
        write_text_atomic(staging / TRACKER, str(iteration))


def load_full_state(src: str | Path, vocab_size: Optional[int] = None
                    ) -> tuple[dict[str, torch.Tensor], ShardLayout]:
    """Read a whole checkpoint (either format) into a full (TP=1 canonical) state dict."""
    ckpt = open_checkpoint(src, vocab_size=vocab_size)
    ckpt.validate_tensors()
    state = {name: ckpt.read(name).clone() for name, _, _ in iter_params(ckpt.layout.cfg)}
    return state, ckpt.layout
