"""A checkpoint's description: format, architecture, layout, iteration, parameters, tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mlmega.checkpoint.dist_format import DistCheckpoint, open_checkpoint
from mlmega.models.params import iter_params, num_parameters


def describe(path: str | Path, tensors: bool = False, vocab_size: Optional[int] = None,
             tokenizer: Optional[str | Path] = None) -> dict:
    """A JSON-ready description; validates every shard's tensors (names and shapes) on the way.
    ``vocab_size`` / ``tokenizer``: the true vocabulary where the args lack it."""
    ckpt = open_checkpoint(path, vocab_size=vocab_size, tokenizer=tokenizer)
    ckpt.validate_tensors()
    layout, cfg = ckpt.layout, ckpt.layout.cfg
    info = dict(format="torch_dist" if isinstance(ckpt, DistCheckpoint) else "torch", arch=cfg.arch, iteration=ckpt.iteration, tp=layout.tp,
                pp=layout.pp, layers_per_stage=list(layout.layers_per_stage),
                parameters=num_parameters(cfg), padded_vocab=layout.padded_vocab,
                vocab_source=ckpt.vocab_source, model=cfg.to_dict())
    if tensors:
        rows = []
        for name, spec, layer in iter_params(cfg):
            pp_rank = layout.stage_of_layer(layer) if layer is not None else \
                (0 if spec.stage == "first" else layout.pp - 1)
            dtype = str(ckpt.read(name).dtype).replace("torch.", "")
            rows.append(dict(name=name, shape=list(layout.global_shape(spec)),
                             tp_dim=spec.tp_dim, stage=pp_rank, dtype=dtype))
        info["tensors"] = rows
    return info

