"""Megatron-LM's torch checkpoint format: one ``model_optim_rng.pt`` per (TP, PP) rank.

    ROOT/latest_checkpointed_iteration.txt        "1000" (or "release" -> ROOT/release/)
    ROOT/iter_0001000/mp_rank_TT[_PPP]/model_optim_rng.pt
        {"args": Namespace, "checkpoint_version": 3.0, "iteration": int, "model": state dict,
         "optimizer"?, "opt_param_scheduler"?, "rng_state"?, ...}

This module knows files and keys, not math. Files are loaded with ``weights_only=True`` and
megatron-core's allow-list of classes (argparse.Namespace, its enums); ``mmap=True`` keeps loading
lazy (shapes and dtypes without data), and :meth:`TorchCheckpoint.read` reads the bytes of the
shards it gathers with ``pread`` (:mod:`mlmega.checkpoint.records`), so a converter reads only the
tensors it asks for and keeps none of the files resident.
"""

from __future__ import annotations

import argparse
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import torch

from mlmega.checkpoint.directory import (CHECKPOINT_VERSION, TRACKER, iteration_dir_name,
                                         latest_directory, layers_per_pp_stage, load_file)
from mlmega.checkpoint.integrity import RecordChecks, StoredFile, check_finite
from mlmega.checkpoint.interface import CheckpointReader, CheckpointWriter, StageTensors
from mlmega.checkpoint.layout import WORD_EMBEDDINGS, ShardLayout
from mlmega.checkpoint.records import RecordFile
from mlmega.checkpoint.streaming import StreamingWriter, save_streaming
from mlmega.checkpoint.vocab import true_vocab_size
from mlmega.config.errors import CheckpointError
from mlmega.config.model import ModelConfig
from mlmega.models.naming import (OUTPUT_LAYER, arch_from_keys, block_name, extra_state_modules,
                                  transformer_impl_of)
from mlmega.models.params import ParamSpec, param_index

SHARD_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


@dataclass
class TorchCheckpoint(CheckpointReader):
    """An opened, validated torch-format checkpoint: its layout, args and shard files."""

    format: ClassVar[str] = "torch"

    root: Path
    iteration: int
    release: bool
    layout: ShardLayout
    args: argparse.Namespace
    vocab_source: str = "args.vocab_size"  # where the true vocabulary size came from
    verify: bool = True  # check each record's checksum before reading it (see integrity.py)
    check_finite: bool = False  # refuse tensors holding NaN/Inf
    _shards: dict[tuple[int, int], dict] = field(default_factory=dict, repr=False)
    _files: dict[tuple[int, int], RecordFile] = field(default_factory=dict, repr=False)
    _checks: dict[tuple[int, int], RecordChecks] = field(default_factory=dict, repr=False)
    # files are opened on first use, from any thread (a converter's writer makes row blocks)
    _opening: threading.RLock = field(default_factory=threading.RLock, repr=False,
                                      compare=False)

    def shard_path(self, tp_rank: int, pp_rank: int) -> Path:
        return self.directory / rank_dir_name(tp_rank, pp_rank, self.layout.pp) / SHARD_FILE

    @classmethod
    def open(cls, root: str | Path, arch: Optional[str] = None,
             cfg: Optional[ModelConfig] = None, vocab_size: Optional[int] = None,
             tokenizer: Optional[str | Path] = None, verify: bool = True,
             check_finite: bool = False) -> "TorchCheckpoint":
        """Validate the directory structure and ``args`` before any tensor is read.

        ``vocab_size`` / ``tokenizer``: the true vocabulary where the args lack it
        (:func:`mlmega.checkpoint.vocab.true_vocab_size`); the padded size is the shards'.
        ``verify``: check records' checksums; ``check_finite``: refuse NaN/Inf.
        """
        root = Path(root)
        iteration, release, directory = latest_directory(root)
        ranks = {}
        for child in sorted(directory.iterdir()):
            match = _RANK_DIR.match(child.name)
            if child.is_dir() and match:
                ranks[(int(match[1]), int(match[2] or 0))] = child
        if not ranks:
            raise CheckpointError(f"{directory}: no mp_rank_* shard directories")
        first = min(ranks)
        checks0 = RecordChecks(ranks[first] / SHARD_FILE) if verify else None
        shard0 = load_file(ranks[first] / SHARD_FILE, checks=checks0)
        args = shard0.get("args")
        if args is None:
            raise CheckpointError(f"{ranks[first] / SHARD_FILE}: no 'args' key; cannot tell the "
                                  f"model configuration")
        source = str(ranks[first] / SHARD_FILE)
        tp = getattr(args, "tensor_model_parallel_size", 1)
        pp = getattr(args, "pipeline_model_parallel_size", 1)
        padded = _stored_vocab_rows(shard0, tp, source)
        vocab, vocab_source = true_vocab_size(args, padded, source, vocab_size, tokenizer)
        found = ModelConfig.from_megatron_args(args, arch=arch or _arch_from_shard(shard0),
                                               source=source, vocab_size=vocab)
        if cfg is not None and cfg.replace(source=found.source) != found:
            raise CheckpointError(f"{source}: checkpoint args describe another model than the "
                                  f"given model config (checkpoint vs given): "
                                  f"{found.differences(cfg)}")
        model = shard0.get("model")
        impl = transformer_impl_of(model.keys() if isinstance(model, dict) else ())
        layout = ShardLayout(found, tp, pp, layers_per_pp_stage(args, found, pp), padded,
                             transformer_impl=impl)
        expected = {(t, p) for t, p in layout.ranks}
        if set(ranks) != expected:
            missing = sorted(expected - set(ranks))
            extra = sorted(set(ranks) - expected)
            raise CheckpointError(f"{directory}: args say TP={tp}, PP={pp} but shard directories "
                                  f"differ: missing {[rank_dir_name(t, p, pp) for t, p in missing]}, "
                                  f"unexpected {[ranks[r].name for r in extra]}")
        for rank, path in ranks.items():
            if not (path / SHARD_FILE).is_file():
                raise CheckpointError(f"{path}: {SHARD_FILE} is missing")
        ckpt = cls(root, iteration, release, layout, args, vocab_source, verify, check_finite)
        ckpt._shards[first] = shard0
        if checks0 is not None:
            ckpt._checks[first] = checks0
        return ckpt

    def shard(self, tp_rank: int, pp_rank: int) -> dict[str, Any]:
        """The whole (lazily mmapped) content of one rank's file."""
        key = (tp_rank, pp_rank)
        with self._opening:
            if key not in self._shards:
                self._shards[key] = load_file(
                    self.shard_path(tp_rank, pp_rank),
                    checks=self.record_checks(tp_rank, pp_rank) if self.verify else None)
            return self._shards[key]

    def record_checks(self, tp_rank: int, pp_rank: int) -> RecordChecks:
        """The checksums of a rank's file, one per file: a record verified once (the pickle
        when the shard loaded, a tensor when read, or all by ``check_all``) is not again."""
        key = (tp_rank, pp_rank)
        with self._opening:
            if key not in self._checks:
                self._checks[key] = RecordChecks(self.shard_path(tp_rank, pp_rank))
            return self._checks[key]

    def _record_file(self, tp_rank: int, pp_rank: int) -> RecordFile:
        """The reader of a rank's file whose content :meth:`shard` loaded (opened on first use:
        opening and validating a checkpoint reads no tensor)."""
        key = (tp_rank, pp_rank)
        with self._opening:
            if key not in self._files:
                self.shard(tp_rank, pp_rank)  # mapped first: RecordFile looks up the mapping
                path = self.shard_path(tp_rank, pp_rank)
                self._files[key] = RecordFile(
                    path, self.record_checks(tp_rank, pp_rank) if self.verify else None)
            return self._files[key]

    def model_state(self, tp_rank: int, pp_rank: int) -> dict[str, torch.Tensor]:
        shard = self.shard(tp_rank, pp_rank)
        model = shard.get("model")
        if not isinstance(model, dict):
            keys = sorted(k for k in shard if k.startswith("model"))
            hint = " (virtual pipeline checkpoints are not supported)" if keys else ""
            raise CheckpointError(f"{self.shard_path(tp_rank, pp_rank)}: no 'model' state dict{hint}")
        return model

    def _args_description(self, args: argparse.Namespace, source: str) -> dict[str, Any]:
        """What ``args`` say of the layout and model, as compared between ranks."""
        cfg = ModelConfig.from_megatron_args(args, arch=self.layout.cfg.arch, source=source,
                                             vocab_size=self.layout.cfg.vocab_size)
        tp = getattr(args, "tensor_model_parallel_size", 1)
        pp = getattr(args, "pipeline_model_parallel_size", 1)
        return {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                "layers_per_pp_stage": layers_per_pp_stage(args, cfg, pp), **cfg.to_dict()}

    def check_rank_agrees(self, tp_rank: int, pp_rank: int) -> None:
        """A rank's ``args`` describe the first rank's model and layout, and its ``iteration`` is
        the one the marker names; CheckpointError naming the file, key, found and expected."""
        path = self.shard_path(tp_rank, pp_rank)
        shard = self.shard(tp_rank, pp_rank)
        stored = shard.get("iteration")
        if not self.release and isinstance(stored, int) and stored != self.iteration:
            raise CheckpointError(f"{path}: iteration={stored}, expected {self.iteration} (named "
                                  f"by {self.root / TRACKER})")
        args = shard.get("args")
        if args is None:
            raise CheckpointError(f"{path}: no 'args' key (every rank stores its args)")
        first = self.shard_path(0, 0)
        expected = self._args_description(self.args, str(first))
        found = self._args_description(args, str(path))
        for key, value in expected.items():
            if found[key] != value:
                raise CheckpointError(f"{path}: args.{key}={found[key]!r}, expected {value!r} "
                                      f"(as in {first})")

    def stored_files(self) -> list[StoredFile]:
        return [StoredFile(self.shard_path(tp_rank, pp_rank)) for tp_rank, pp_rank
                in self.layout.ranks]

    def validate_tensors(self) -> None:
        """Every rank agrees with the first (args, iteration) and holds exactly the tensors its
        layout expects, with the expected shapes."""
        for tp_rank, pp_rank in self.layout.ranks:
            self.check_rank_agrees(tp_rank, pp_rank)
            state = self.model_state(tp_rank, pp_rank)
            path = self.shard_path(tp_rank, pp_rank)
            expected = {p.local_name: p for p in self.layout.pp_stage_params(pp_rank)}
            have = {k for k, v in state.items() if not k.endswith("_extra_state")}
            if set(expected) != have:
                raise CheckpointError(f"{path}: tensors do not match the args' model: missing "
                                      f"{sorted(set(expected) - have)[:5]}, unexpected "
                                      f"{sorted(have - set(expected))[:5]}")
            for name, param in expected.items():
                shape = self.layout.local_shape(param.spec)
                if tuple(state[name].shape) != shape:
                    raise CheckpointError(f"{path}: {name} has shape {tuple(state[name].shape)}, "
                                          f"expected {shape} for TP={self.layout.tp}")

    def _read_into(self, out: torch.Tensor, tp_rank: int, pp_rank: int, local: str,
                   stored: torch.Tensor) -> None:
        """Fill ``out`` with rank (tp_rank, pp_rank)'s (mmapped) tensor ``local`` or a part of it
        ``stored``: its record checksummed first, its values checked finite if asked."""
        self._record_file(tp_rank, pp_rank).read_into(out, stored)
        if self.check_finite:
            check_finite(out, f"{self.shard_path(tp_rank, pp_rank)}: {local}")

    def _stored(self, global_name: str) -> tuple[ParamSpec, int, str]:
        """(spec, pipeline stage, local name) under which this checkpoint stores ``global_name``."""
        spec, layer = param_index(self.layout.cfg)[global_name]
        pp_rank = 0 if layer is None and spec.pp_stage == "first" else \
            self.layout.pp - 1 if layer is None else self.layout.pp_stage_of_layer(layer)
        local = global_name if layer is None else \
            self.layout.local_name(spec, layer - self.layout.pp_stage_layers(pp_rank).start)
        return spec, pp_rank, local

    def read(self, global_name: str) -> torch.Tensor:
        """The canonical full tensor of ``global_name``, gathered over TP from its stage, in fresh
        memory: each shard's bytes are read from its file into their place in the result."""
        spec, pp_rank, local = self._stored(global_name)
        shards = [self.model_state(t, pp_rank)[local] for t in range(self.layout.tp)]

        def fill(region: torch.Tensor, tp_rank: int) -> None:
            self._read_into(region, tp_rank, pp_rank, local, shards[tp_rank])

        return self.layout.gather(spec, shards, fill)

    def read_rows(self, global_name: str, start: int, count: int) -> torch.Tensor:
        """Rows [start, start + count) of the canonical full tensor of ``global_name`` (dim 0; a
        parameter that TP splits on the vocab, or not at all), in fresh memory: read from the
        shards that hold them, none of the other rows."""
        spec, pp_rank, local = self._stored(global_name)
        if spec.tp_dim is not None and spec.dims[spec.tp_dim] != "vocab":
            raise ValueError(f"{global_name}: TP splits it on dim {spec.tp_dim}, not on rows")
        split = spec.tp_dim is not None
        shards = [self.model_state(t, pp_rank)[local]
                  for t in (range(self.layout.tp) if split else [0])]
        out = torch.empty((count, *shards[0].shape[1:]), dtype=shards[0].dtype)
        per_rank = shards[0].shape[0] if split else count + start
        stored_rows = per_rank * len(shards)
        if start + count > stored_rows:  # the canonical rows past the stored padding are zero
            out.narrow(0, max(0, stored_rows - start), start + count - max(start, stored_rows)
                       ).zero_()
        for tp_rank, stored in enumerate(shards):
            lo = max(start, tp_rank * per_rank)
            hi = min(start + count, (tp_rank + 1) * per_rank)
            if lo < hi:
                self._read_into(out.narrow(0, lo - start, hi - lo), tp_rank, pp_rank, local,
                                stored.narrow(0, lo - tp_rank * per_rank, hi - lo))
        return out

    def stores_shards_of(self, layout: ShardLayout) -> bool:
        return layout.tp == self.layout.tp and layout.layers_per_pp_stage == self.layout.layers_per_pp_stage

    def read_shard(self, global_name: str, tp_rank: int) -> torch.Tensor:
        """TP rank ``tp_rank``'s stored shard of ``global_name`` (at this checkpoint's own layout),
        in fresh memory: what ``layout.split(read(global_name), tp_rank)`` gives, without a
        gather."""
        spec, pp_rank, local = self._stored(global_name)
        stored = self.model_state(tp_rank, pp_rank)[local]
        out = torch.empty(stored.shape, dtype=stored.dtype)
        self._read_into(out, tp_rank, pp_rank, local, stored)
        return self.layout.zero_padding(spec, out, tp_rank)


def _arch_from_shard(shard: dict) -> Optional[str]:
    return arch_from_keys(shard["model"]) if isinstance(shard.get("model"), dict) else None


def _stored_vocab_rows(shard: dict, tp: int, source: str) -> Optional[int]:
    """The padded vocabulary the shards hold: the rows of the first stage's word-embedding shard
    times TP, checked against ``args.padded_vocab_size`` (None: no such shard; validation says)."""
    weight = shard.get("model", {}).get(WORD_EMBEDDINGS) if isinstance(shard.get("model"), dict) \
        else None
    if weight is None or weight.dim() != 2:
        return None
    rows = weight.shape[0] * tp
    in_args = getattr(shard.get("args"), "padded_vocab_size", None)
    if in_args is not None and in_args != rows:
        raise CheckpointError(f"{source}: args.padded_vocab_size={in_args} but {WORD_EMBEDDINGS} "
                              f"has {weight.shape[0]} rows per TP rank ({rows} over TP={tp})")
    return rows


def shard_content(layout: ShardLayout, pp_rank: int, model: dict[str, torch.Tensor],
                  iteration: int, extra_args: Optional[dict] = None, **extra: Any) -> dict[str, Any]:
    """The dict Megatron-LM keeps in one rank's ``model_optim_rng.pt`` (loads strictly into a model)."""
    model = dict(model)
    block = block_name(layout.cfg)
    for layer in range(len(layout.pp_stage_layers(pp_rank))):
        for module in extra_state_modules(layout.transformer_impl):
            model.setdefault(f"{block}.layers.{layer}.{module}._extra_state", None)
    if pp_rank == layout.pp - 1:  # the output layer module exists even when its weight is tied
        model.setdefault(f"{OUTPUT_LAYER}._extra_state", None)
    dtype = next((v.dtype for v in model.values() if isinstance(getattr(v, "dtype", None),
                                                                torch.dtype)), torch.float32)
    args = argparse.Namespace(**{**layout.megatron_args(dtype), "ckpt_format": "torch",
                                 **(extra_args or {}), "iteration": iteration})
    return {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
            "model": model, **extra}


def write_rank_file(root: Path, layout: ShardLayout, tp_rank: int, pp_rank: int,
                    model: dict[str, torch.Tensor], iteration: int,
                    extra_args: Optional[dict] = None, checksums: Optional[bool] = None,
                    **extra: Any) -> Path:
    """Write one rank's ``model_optim_rng.pt`` under checkpoint root ``root``; returns its path.

    ``model`` values may be :class:`~mlmega.checkpoint.streaming.LazyTensor` producers: the file is
    written tensor by tensor (:func:`~mlmega.checkpoint.streaming.save_streaming`), so only the
    tensor being written needs to be in memory. ``checksums``: see StreamingWriter.
    """
    path = rank_file_path(root, layout, tp_rank, pp_rank, iteration)
    save_streaming(shard_content(layout, pp_rank, model, iteration, extra_args, **extra), path,
                   checksums)
    return path


def rank_file_path(root: Path, layout: ShardLayout, tp_rank: int, pp_rank: int,
                   iteration: int) -> Path:
    """Where rank (tp_rank, pp_rank)'s file goes under checkpoint root ``root`` (directory made)."""
    path = root / iteration_dir_name(iteration) / rank_dir_name(tp_rank, pp_rank, layout.pp)
    path.mkdir(parents=True, exist_ok=True)
    return path / SHARD_FILE


class TorchWriter(CheckpointWriter):
    """One ``model_optim_rng.pt`` per rank, written tensor by tensor (lazy values produced as
    they are written)."""

    name = "torch"

    def write_rank(self, root: Path, layout: ShardLayout, tp_rank: int, pp_rank: int,
                   model: Mapping[str, Any], iteration: int,
                   extra_args: Optional[dict] = None) -> Path:
        return write_rank_file(root, layout, tp_rank, pp_rank, dict(model), iteration, extra_args)

    def write_pp_stage(self, root: Path, layout: ShardLayout, pp_rank: int, tp_ranks: Sequence[int],
                    tensors: StageTensors, iteration: int, extra_args: Optional[dict],
                    written: Callable[[int, int], None], checksums: bool = False) -> None:
        """The ranks' files side by side (one StreamingWriter each): every full tensor is made once
        for all of them, and memory stays at a parameter's full tensor plus its shards."""
        paths = {r: rank_file_path(root, layout, r, pp_rank, iteration) for r in tp_ranks}
        records: dict[int, dict] = {r: {} for r in tp_ranks}

        def write(name: str, shards: list) -> None:
            for r in tp_ranks:
                shard = shards.pop(0)
                records[r][name] = writers[r].write_tensor(shard, remember=False)
                written(r, shard.nbytes)
                del shard

        # One parameter is written (a thread: the writer's os.write releases the GIL) while the
        # next is gathered and mapped: at most two parameters' shards are alive.
        with ExitStack() as stack, ThreadPoolExecutor(max_workers=1) as io:
            writers = {r: stack.enter_context(StreamingWriter(paths[r], checksums=checksums))
                       for r in tp_ranks}
            pending = None
            for name, shards in tensors(tp_ranks):
                if pending is not None:
                    pending.result()
                pending = io.submit(write, name, shards)
                del shards
            if pending is not None:
                pending.result()
            for r in tp_ranks:
                writers[r].finish(shard_content(layout, pp_rank, records[r], iteration,
                                                extra_args))
