"""megatron-core's distributed checkpoint format (``torch_dist``): lazy reading, per-rank writing.

    ROOT/latest_checkpointed_iteration.txt       "1000" (or "release" -> ROOT/release/)
    ROOT/iter_0001000/
        metadata.json     {"sharded_backend": "torch_dist", ...}       (megatron-core's marker)
        common.pt         {"args": Namespace, "checkpoint_version": 3.0, "iteration": int, ...}
        .metadata         torch.distributed.checkpoint Metadata: every key's global shape, dtype and
                          chunks, and where (file, byte offset, length) each chunk is stored
        __R_N.distcp      the chunks rank R wrote (each chunk one ``torch.save`` blob)

The layout on disk is global: a key holds one global tensor, however many ranks wrote its chunks.
megatron-core 0.16 stores (local layer spec and TransformerEngine spec alike):

  * uniform layer stacks under one key per module with a prepended layer axis, e.g.
    ``decoder.layers.mlp.linear_fc1.weight`` of shape [num_layers, 2F, D] (offset = global layer);
  * the layer norms under TE's fused names: ``input_layernorm.{weight,bias}`` ->
    ``self_attention.linear_qkv.layer_norm_{weight,bias}``, ``pre_mlp_layernorm.*`` ->
    ``mlp.linear_fc1.layer_norm_*`` (:data:`mlmega.models.naming.TE_FUSED_NORMS`), so the tensors
    of a TE-trained and a local-spec checkpoint are keyed alike; the layout's ``transformer_impl``
    (``args.transformer_impl``) decides which modules' ``_extra_state`` are written;
  * SwiGLU fc1 as the global [G; U] (each TP rank writes its gate and up halves as two chunks),
    fused QKV as the global group-major rows, i.e. exactly mlmega's canonical TP=1 layouts;
  * the word embeddings (and an untied / BERT ``output_layer``) with the vocabulary padded for
    the saving TP size (megatron loads them with ``allow_shape_mismatch``); a tied embedding's
    last-stage copy is a non-main replica of ``embedding.word_embeddings.weight`` (not stored);
  * ``_extra_state`` of the parallel linears as byte objects ``<key>/shard_<offset>_<shape>``.

Checkpoints saved with ``singleton_local_shards`` (per-layer keys ``decoder.layers.<i>.<module>``
and SwiGLU halves ``..._w`` / ``..._v``) are read too.

Reading never loads the checkpoint: ``DistCheckpoint.read`` plans the chunks overlapping one
parameter (one layer of a stack) from ``.metadata`` and reads just those from the ``.distcp`` files.
Writing needs no process group: :func:`write_dist_rank` writes one target rank's chunks to its own
``__R_0.distcp`` plus a small index part; :func:`finalize_dist`, run once after every rank, merges
the parts into ``.metadata`` and writes ``common.pt`` and ``metadata.json``. Any megatron-core model
of the same architecture, at any TP/PP, loads the result with
``dist_checkpointing.load(model.sharded_state_dict(), directory)``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, Sequence

import torch

from mlmega import compat
from mlmega.checkpoint.atomic import write_text_atomic, writing
from mlmega.checkpoint.integrity import (RecordChecks, StoredFile, check_finite,
                                         write_file_manifest, write_manifest)
from mlmega.checkpoint.interface import CheckpointReader, CheckpointWriter, StageTensors
from mlmega.checkpoint.layout import WORD_EMBEDDINGS, ShardLayout, pad_rows
from mlmega.checkpoint.streaming import LazyTensor, StreamingWriter, materialized
from mlmega.checkpoint.unpickle import load_dist_metadata
from mlmega.checkpoint.vocab import true_vocab_size
from mlmega.checkpoint.directory import (CHECKPOINT_VERSION, TRACKER, iteration_dir_name,
                                         latest_directory, layers_per_pp_stage, load_file)
from mlmega.config.errors import CheckpointError
from mlmega.config.model import ModelConfig
from mlmega.models.naming import (MODEL_PREFIXES, OUTPUT_LAYER, TE_FUSED_NORMS, arch_from_keys,
                                  block_name, extra_state_modules)
from mlmega.models.params import ParamSpec, global_shape, iter_params, param_index, space_layout

BACKEND = "torch_dist"
CONFIG_FILE = "metadata.json"  # megatron-core's marker of a distributed checkpoint
COMMON_FILE = "common.pt"
METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's index of keys, chunks and files
DATA_SUFFIX = ".distcp"
_INDEX_PART = ".mlmega-index-{rank}.json"  # a writer rank's part of .metadata (finalize removes)
# What Megatron-LM (0.16) records as the content metadata of the sharded state dict it saves.
CONTENT_METADATA = {"singleton_local_shards": False,
                    "distrib_optim_sharding_type": "dp_reshardable",
                    "chained_optim_avoid_prefix": True}


# -- keys ------------------------------------------------------------------------------------------
def _layer_module(cfg: ModelConfig, spec: ParamSpec, fused_norm_names: bool = True) -> str:
    """The part of a per-layer template after ``<block>.layers.{}.``, in torch_dist naming."""
    prefix = f"{block_name(cfg)}.layers.{{}}."
    rest = spec.template[len(prefix):]
    if fused_norm_names:
        for old, new in TE_FUSED_NORMS:  # the local spec's sharded_state_dict_keys_map
            if rest.startswith(old):
                return new + rest[len(old):]
    return rest


def dist_key(cfg: ModelConfig, spec: ParamSpec) -> str:
    """The key megatron-core stores ``spec`` under (per-layer: the stacked key for all layers)."""
    if not spec.per_layer:
        return spec.template
    return f"{block_name(cfg)}.layers.{_layer_module(cfg, spec)}"


@dataclass(frozen=True)
class Location:
    """Where a canonical parameter lives in a torch_dist checkpoint."""

    key: str  # the torch_dist key (of the first part, when ``parts``)
    layer: Optional[int] = None  # index on the key's prepended layer axis; None: no layer axis
    parts: tuple[str, ...] = ()  # singleton SwiGLU: the [gate, up] keys, concatenated on tp_dim


# -- reading ---------------------------------------------------------------------------------------
def is_dist_directory(directory: Path) -> bool:
    """Whether an iteration directory holds a distributed (rather than mp_rank_*) checkpoint."""
    return any((directory / name).exists() for name in (CONFIG_FILE, METADATA_FILE, COMMON_FILE)) \
        or any(directory.glob(f"*{DATA_SUFFIX}"))


@dataclass
class DistCheckpoint(CheckpointReader):
    """An opened torch_dist checkpoint: its layout (from ``args``), index and files, read lazily."""

    format: ClassVar[str] = BACKEND

    root: Path
    iteration: int
    release: bool
    layout: ShardLayout
    args: Optional[argparse.Namespace]
    metadata: Any = field(repr=False)  # torch.distributed.checkpoint Metadata
    common: dict = field(default_factory=dict, repr=False)
    vocab_source: str = "args.vocab_size"  # where the true vocabulary size came from
    _reader: Any = field(default=None, repr=False)
    verify: bool = True  # check each chunk's checksum before reading it (see integrity.py)
    check_finite: bool = False  # refuse tensors holding NaN/Inf
    _checks: dict[str, RecordChecks] = field(default_factory=dict, repr=False)

    @property
    def tensor_keys(self) -> dict[str, tuple[int, ...]]:
        """Every tensor key in the checkpoint and its global shape (optimizer state included)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {k: tuple(v.size) for k, v in self.metadata.state_dict_metadata.items()
                if isinstance(v, TensorStorageMetadata)}

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, arch: Optional[str] = None,
             cfg: Optional[ModelConfig] = None, vocab_size: Optional[int] = None,
             tokenizer: Optional[str | Path] = None, verify: bool = True,
             check_finite: bool = False) -> "DistCheckpoint":
        """Validate the marker, index, files and ``args`` before any tensor is read
        (``vocab_size`` / ``tokenizer``: see :meth:`TorchCheckpoint.open`)."""
        from torch.distributed.checkpoint import FileSystemReader

        root = Path(root)
        iteration, release, directory = latest_directory(root)
        _check_backend(directory / CONFIG_FILE)
        metadata_path = directory / METADATA_FILE
        if not metadata_path.is_file():
            raise CheckpointError(f"{metadata_path}: file is missing (the torch_dist index of keys "
                                  f"and chunks)")
        if verify:  # a manifest, where mlmega wrote it (torch's own index has no checksums)
            RecordChecks(metadata_path, "file").check_all()
        metadata = load_dist_metadata(metadata_path)  # never torch's plain pickle.load
        reader = FileSystemReader(str(directory))
        try:
            reader.set_up_storage_reader(metadata, True)
        except Exception as err:  # an index without storage data
            raise CheckpointError(f"{metadata_path}: cannot read the checkpoint index "
                                  f"({type(err).__name__}: {err})") from None
        _check_data_files(directory, metadata)
        common_path = directory / COMMON_FILE
        common = load_file(common_path, mmap=False,
                           checks=RecordChecks(common_path) if verify else None)
        if not isinstance(common, dict):
            raise CheckpointError(f"{common_path}: expected a dict, got {type(common).__name__}")
        args = common.get("args")
        source = str(common_path)
        vocab_source = "the given model config"
        if args is None:
            if cfg is None:
                raise CheckpointError(f"{common_path}: no 'args' key; cannot tell the model "
                                      f"configuration (pass the model config)")
            layout = ShardLayout(cfg)
        else:
            word = metadata.state_dict_metadata.get(WORD_EMBEDDINGS)
            padded = word.size[0] if getattr(word, "size", None) else None
            vocab, vocab_source = true_vocab_size(args, padded, source, vocab_size, tokenizer)
            found = ModelConfig.from_megatron_args(
                args, arch=arch or arch_from_keys(metadata.state_dict_metadata), source=source,
                vocab_size=vocab)
            if cfg is not None and cfg.replace(source=found.source) != found:
                raise CheckpointError(f"{source}: checkpoint args describe another model than "
                                      f"the given model config (checkpoint vs given): "
                                      f"{found.differences(cfg)}")
            tp = getattr(args, "tensor_model_parallel_size", 1) or 1
            pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
            impl = getattr(args, "transformer_impl", "local")
            layout = ShardLayout(found, tp, pp, layers_per_pp_stage(args, found, pp), padded,
                                 transformer_impl="transformer_engine"
                                 if impl == "transformer_engine" else "local")
        stored = common.get("iteration")
        if not release and isinstance(stored, int) and stored != iteration:
            raise CheckpointError(f"{common_path}: iteration {stored} differs from {iteration} "
                                  f"named by {root / TRACKER}")
        return cls(root, iteration, release, layout, args, metadata, common, vocab_source, reader,
                   verify, check_finite)

    # -- locating and reading -----------------------------------------------------------------
    def locate(self, global_name: str) -> Location:
        """The key (and layer index) holding ``global_name``; CheckpointError if it is not stored."""
        spec, layer = param_index(self.layout.cfg)[global_name]
        keys = self.metadata.state_dict_metadata
        block = block_name(self.layout.cfg)
        candidates: list[tuple[str, Optional[int]]] = []
        if spec.per_layer:
            for fused in (True, False):
                module = _layer_module(self.layout.cfg, spec, fused)
                candidates += [(f"{block}.layers.{module}", layer),  # uniform stack
                               (f"{block}.layers.{layer}.{module}", None)]  # per-layer keys
        else:
            candidates.append((spec.template, None))
        gated = spec.tp_dim is not None and spec.dims[spec.tp_dim] == "ffn_gated"
        for key, index in candidates:
            if key in keys:
                return Location(key, index)
            if gated and f"{key}_w" in keys and f"{key}_v" in keys:
                return Location(f"{key}_w", index, (f"{key}_w", f"{key}_v"))
        raise CheckpointError(f"{self.directory / METADATA_FILE}: no tensor for {global_name} "
                              f"(looked for {[k for k, _ in dict.fromkeys(candidates)]})")

    def read(self, global_name: str) -> torch.Tensor:
        """The canonical full tensor of ``global_name`` (TP=1 layout, vocab padded for TP=1)."""
        spec, _ = param_index(self.layout.cfg)[global_name]
        where = self.locate(global_name)
        parts = [self._read_key(key, where.layer) for key in (where.parts or (where.key,))]
        full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=spec.tp_dim)
        if self.check_finite:
            check_finite(full, f"{self.directory}: {where.key}")
        if spec.tp_dim is not None and spec.dims[spec.tp_dim] == "vocab":
            full = pad_rows(full, spec.tp_dim, self.layout.cfg.padded_vocab_size(1))
        return full

    def read_rows(self, global_name: str, start: int, count: int) -> torch.Tensor:
        spec, _ = param_index(self.layout.cfg)[global_name]
        if spec.tp_dim is not None and spec.dims[spec.tp_dim] != "vocab":
            raise ValueError(f"{global_name}: TP splits it on dim {spec.tp_dim}, not on rows")
        where = self.locate(global_name)
        if where.layer is not None or where.parts:
            return self.read(global_name).narrow(0, start, count)
        size = tuple(self.metadata.state_dict_metadata[where.key].size)
        out = torch.zeros((count, *size[1:]), dtype=self.metadata.state_dict_metadata[
            where.key].properties.dtype)
        stored = max(0, min(count, size[0] - start))  # rows past the stored ones: padding
        if stored:
            out[:stored] = self.read_region(where.key, (start,) + (0,) * (len(size) - 1),
                                            (stored,) + size[1:])
        return out

    def read_shard(self, global_name: str, tp_rank: int) -> torch.Tensor:
        spec, _ = param_index(self.layout.cfg)[global_name]
        return self.layout.split(spec, self.read(global_name), tp_rank)

    def _read_key(self, key: str, layer: Optional[int]) -> torch.Tensor:
        size = tuple(self.metadata.state_dict_metadata[key].size)
        if layer is None:
            return self.read_region(key, (0,) * len(size), size)
        region = self.read_region(key, (layer,) + (0,) * (len(size) - 1), (1,) + size[1:])
        return region[0]

    def read_region(self, key: str, offsets: tuple[int, ...],
                    sizes: tuple[int, ...]) -> torch.Tensor:
        """Block [offsets, offsets + sizes) of global tensor ``key``, reading only its chunks."""
        md = self.metadata.state_dict_metadata[key]
        out = torch.empty(sizes, dtype=md.properties.dtype)
        items = compat.chunk_read_items(key, md, offsets, sizes)
        covered = sum(math.prod(item.lengths) for item in items)
        if covered != out.numel():
            raise CheckpointError(f"{self.directory / METADATA_FILE}: the stored chunks of {key} cover "
                                  f"{covered} of the {out.numel()} elements at offset {list(offsets)}; "
                                  f"the checkpoint is incomplete")
        by_file: dict[str, list] = {}
        for item in items:
            stored = self.metadata.storage_data[item.storage_index]
            by_file.setdefault(stored.relative_path, []).append(item)
            if self.verify:
                if stored.relative_path not in self._checks:
                    self._checks[stored.relative_path] = RecordChecks(
                        self.directory / stored.relative_path, "blobs")
                self._checks[stored.relative_path].check(stored.offset, stored.length)
        for name, file_items in by_file.items():
            try:
                compat.read_items(self._reader, file_items, out)
            except CheckpointError:
                raise
            except Exception as err:
                raise CheckpointError(f"{self.directory / name}: cannot read {key} "
                                      f"({type(err).__name__}: {err})") from None
        return out

    # -- validation ---------------------------------------------------------------------------
    def stored_files(self) -> list[StoredFile]:
        blobs: dict[str, list[tuple[int, int]]] = {}  # byte objects are raw bytes, not archives
        tensors = self.tensor_keys
        for index, info in self.metadata.storage_data.items():
            ranges = blobs.setdefault(info.relative_path, [])
            if index.fqn in tensors:
                ranges.append((info.offset, info.length))
        return [StoredFile(self.directory / METADATA_FILE, "file"),
                StoredFile(self.directory / COMMON_FILE),
                *(StoredFile(self.directory / name, "blobs", tuple(sorted(ranges)))
                  for name, ranges in sorted(blobs.items()))]

    def validate_tensors(self) -> None:
        """Every parameter of the args' model is stored, with the expected global shape, and no
        model tensor is left over (optimizer state and byte objects are ignored)."""
        cfg = self.layout.cfg
        index = self.directory / METADATA_FILE
        shapes = self.tensor_keys
        used: set[str] = set()
        for name, spec, layer in iter_params(cfg):
            where = self.locate(name)
            expected = list(global_shape(cfg, spec))
            for key in where.parts or (where.key,):
                used.add(key)
                shape = list(shapes[key])
                if where.layer is not None:
                    if not shape or shape[0] != cfg.num_layers:
                        raise CheckpointError(f"{index}: {key} has shape {tuple(shape)}; expected a "
                                              f"leading layer axis of num_layers={cfg.num_layers}")
                    shape = shape[1:]
                want = list(expected)
                if where.parts:
                    want[spec.tp_dim] //= len(where.parts)
                vocab_dim = spec.dims.index("vocab") if "vocab" in spec.dims else None
                if vocab_dim is not None and len(shape) == len(want) \
                        and shape[vocab_dim] >= cfg.vocab_size:
                    want[vocab_dim] = shape[vocab_dim]  # any TP's vocab padding
                if shape != want:
                    raise CheckpointError(f"{index}: {key} (for {name}) has shape {tuple(shape)}, "
                                          f"expected {tuple(want)} for the args' model")
        extra = sorted(k for k in shapes if k.startswith(MODEL_PREFIXES) and k not in used)
        if extra:
            raise CheckpointError(f"{index}: model tensors that the args' model does not have: "
                                  f"{extra[:5]}{'...' if len(extra) > 5 else ''}")


def _check_backend(path: Path) -> None:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing; not a megatron-core distributed checkpoint "
                              f"(or its save did not finish)") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read ({type(err).__name__}: {err})") from None
    backend = config.get("sharded_backend") if isinstance(config, dict) else None
    if backend != BACKEND:
        raise CheckpointError(f"{path}: sharded_backend={backend!r}; only {BACKEND!r} is supported")


def _check_data_files(directory: Path, metadata) -> None:
    """Every data file the index names exists and is long enough for the chunks it holds."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file is missing (named by {directory / METADATA_FILE})") \
                from None
        if size < end:
            raise CheckpointError(f"{path}: truncated: {size} bytes, but {directory / METADATA_FILE} "
                                  f"places data up to byte {end}")


# -- writing ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """One piece of a global tensor (or one byte object) that a writer rank stores."""

    key: str  # tensor key, or a byte object's unique key "<key>/shard_<offset>_<shape>"
    data: Any  # torch.Tensor (its own storage), or bytes for an object
    global_shape: tuple[int, ...] = ()
    offsets: tuple[int, ...] = ()

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.data, torch.Tensor)


def writer_rank(layout: ShardLayout, tp_rank: int, pp_rank: int) -> int:
    """The rank number in data file names (megatron's order: TP fastest, then PP)."""
    return pp_rank * layout.tp + tp_rank


def rank_chunks(layout: ShardLayout, tp_rank: int, pp_rank: int,
                model: Mapping[str, Any]) -> Iterator[Chunk]:
    """The chunks target rank (tp_rank, pp_rank) of ``layout`` saves, as megatron-core would: main
    replicas only (replicated tensors from TP rank 0; a tied embedding's last-stage copy never),
    SwiGLU fc1 [gate_r; up_r] as two chunks of the global [G; U], layer stacks with the layer axis.

    ``model`` maps the rank's local names (``layout.pp_stage_params``) to its TP shards.
    """
    cfg = layout.cfg
    for param in layout.pp_stage_params(pp_rank):
        spec = param.spec
        try:
            value = model[param.local_name]
        except KeyError:
            raise CheckpointError(f"rank tp{tp_rank} pp{pp_rank}: no tensor for {param.local_name}") \
                from None
        # Lazy producers are produced in stage order even when not stored (they may be one
        # sequential stream): the tied output copy (a replica of embedding.word_embeddings.weight)
        # and, on TP ranks > 0, replicated tensors are main replicas elsewhere.
        shard = value.produce() if hasattr(value, "produce") else value
        if (not spec.per_layer and param.local_name != param.global_name) \
                or (spec.tp_dim is None and tp_rank != 0):
            del shard
            if getattr(value, "release", None) is not None:
                value.release()
            continue
        expected = layout.local_shape(spec)
        if tuple(shard.shape) != expected:
            raise CheckpointError(f"rank tp{tp_rank} pp{pp_rank}: {param.local_name} has shape "
                                  f"{tuple(shard.shape)}, expected {expected} for TP={layout.tp}")
        shape = layout.global_shape(spec)
        pieces = [((0,) * shard.dim(), shard)]
        if spec.tp_dim is not None:
            dim = spec.tp_dim
            lead, length = space_layout(cfg, spec.dims[dim], layout.tp)
            local = length // layout.tp
            pieces = []
            for j, part in enumerate(shard.chunk(lead, dim=dim)):
                offsets = [0] * shard.dim()
                offsets[dim] = j * length + tp_rank * local
                pieces.append((tuple(offsets), part))
        key = dist_key(cfg, spec)
        for offsets, part in pieces:
            data = part.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            if spec.per_layer:
                yield Chunk(key, data.unsqueeze(0), (cfg.num_layers,) + tuple(shape),
                            (param.layer,) + offsets)
            else:
                yield Chunk(key, data, tuple(shape), offsets)
        del shard, pieces
        if getattr(value, "release", None) is not None:
            value.release()
    if tp_rank != 0:
        return
    no_state = io.BytesIO()
    torch.save([None], no_state)  # what megatron stores for a module without extra state
    block = block_name(cfg)
    for layer in layout.pp_stage_layers(pp_rank):
        for module in extra_state_modules(layout.transformer_impl):
            yield Chunk(f"{block}.layers.{module}._extra_state/shard_{layer}_{cfg.num_layers}",
                        no_state.getvalue())
    if cfg.arch == "bert" and pp_rank == layout.pp - 1:  # GPTModel drops its output layer's
        yield Chunk(f"{OUTPUT_LAYER}._extra_state/shard_0_1", no_state.getvalue())


def write_dist_rank(directory: str | Path, layout: ShardLayout, tp_rank: int, pp_rank: int,
                    model: Mapping[str, Any]) -> Path:
    """Write target rank (tp_rank, pp_rank)'s chunks into iteration directory ``directory``.

    Creates ``__R_0.distcp`` (R = :func:`writer_rank`; each chunk a ``torch.save`` blob, as
    torch.distributed.checkpoint's FileSystemWriter stores them) and this rank's index part, which
    :func:`finalize_dist` merges into ``.metadata``. Ranks are independent (no process group), so
    they may run in any order, in parallel processes or as separate jobs. ``model`` values may be
    lazy producers (objects with ``produce()`` and optional ``release()``, e.g.
    :class:`mlmega.checkpoint.streaming.LazyTensor`): each is produced when it is written, so only
    one parameter's shard is in memory at a time. Returns the data file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rank = writer_rank(layout, tp_rank, pp_rank)
    name = f"__{rank}_0{DATA_SUFFIX}"
    records, checksums = [], []
    with open(directory / name, "wb", buffering=0) as stream, writing(directory / name):
        for chunk in rank_chunks(layout, tp_rank, pp_rank, model):
            offset = stream.tell()
            if chunk.is_tensor:  # one archive as torch.save writes it (without CRC32s: hashed)
                writer = StreamingWriter(stream, checksums=False)
                writer.finish(chunk.data)
                checksums += writer.checksum_records()
                records.append(dict(kind="tensor", key=chunk.key,
                                    global_shape=list(chunk.global_shape),
                                    offsets=list(chunk.offsets), sizes=list(chunk.data.shape),
                                    dtype=str(chunk.data.dtype).removeprefix("torch.")))
            else:
                stream.write(chunk.data)
                records.append(dict(kind="bytes", key=chunk.key))
            records[-1].update(file=name, offset=offset, length=stream.tell() - offset)
        os.fsync(stream.fileno())
    write_manifest(directory / name, checksums)
    write_text_atomic(directory / _INDEX_PART.format(rank=rank),
                      json.dumps({"rank": rank, "tp_rank": tp_rank, "pp_rank": pp_rank,
                                  "chunks": records}))
    return directory / name


def common_state(layout: ShardLayout, iteration: int, extra_args: Optional[dict] = None,
                 dtype: torch.dtype = torch.float32, **extra: Any) -> dict[str, Any]:
    """What ``common.pt`` holds, as Megatron-LM saves it (args first: readers need the model)."""
    args = argparse.Namespace(**{**layout.megatron_args(dtype), "ckpt_format": BACKEND,
                                 **(extra_args or {}), "iteration": iteration})
    return {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
            "content_metadata": dict(CONTENT_METADATA), **extra}


def finalize_dist(directory: str | Path, layout: ShardLayout, iteration: int,
                  extra_args: Optional[dict] = None, **extra: Any) -> None:
    """After every rank's :func:`write_dist_rank`: check that the chunks tile every key, merge the
    index parts into ``.metadata``, then write ``common.pt`` and (last) ``metadata.json``."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata,
                                                       Metadata, MetadataIndex, TensorProperties,
                                                       TensorStorageMetadata)
    from torch.distributed.checkpoint.storage import WriteResult

    directory = Path(directory)
    parts = {}
    for tp_rank, pp_rank in layout.ranks:
        rank = writer_rank(layout, tp_rank, pp_rank)
        path = directory / _INDEX_PART.format(rank=rank)
        try:
            parts[path] = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing: rank tp{tp_rank} pp{pp_rank} did not finish "
                                  f"writing") from None
    tensors: dict[str, TensorStorageMetadata] = {}
    objects: dict[str, BytesStorageMetadata] = {}
    results = []
    for path, part in parts.items():
        for record in part["chunks"]:
            key = record["key"]
            info = compat.storage_info(record["file"], record["offset"], record["length"])
            if record["kind"] == "bytes":
                objects[key] = BytesStorageMetadata()
                index = MetadataIndex(key)
            else:
                dtype = getattr(torch, record["dtype"])
                md = tensors.setdefault(key, TensorStorageMetadata(
                    TensorProperties(dtype=dtype), torch.Size(record["global_shape"]), []))
                if list(md.size) != record["global_shape"] or md.properties.dtype != dtype:
                    raise CheckpointError(f"{path}: {key} is {record['dtype']} "
                                          f"{record['global_shape']} here but {md.properties.dtype} "
                                          f"{list(md.size)} in another rank's part")
                md.chunks.append(ChunkStorageMetadata(torch.Size(record["offsets"]),
                                                      torch.Size(record["sizes"])))
                index = MetadataIndex(key, record["offsets"])
            results.append(WriteResult(index=index, size_in_bytes=record["length"],
                                       storage_data=info))
    for key, md in tensors.items():  # chunks are disjoint by construction: check they tile the key
        covered = sum(math.prod(c.sizes) for c in md.chunks)
        if covered != math.prod(md.size):
            raise CheckpointError(f"{directory}: the ranks' chunks of {key} cover {covered} of its "
                                  f"{math.prod(md.size)} elements")
    dtype = tensors[WORD_EMBEDDINGS].properties.dtype if WORD_EMBEDDINGS in tensors \
        else torch.float32
    with writing(directory / METADATA_FILE):
        FileSystemWriter(str(directory)).finish(Metadata({**tensors, **objects}), [results])
        write_file_manifest(directory / METADATA_FILE)
    with writing(directory / COMMON_FILE):
        torch.save(common_state(layout, iteration, extra_args, dtype, **extra),
                   directory / COMMON_FILE)
    for path in parts:
        path.unlink()
    write_text_atomic(directory / CONFIG_FILE, json.dumps(
        {"sharded_backend": BACKEND, "sharded_backend_version": 1, "common_backend": "torch",
         "common_backend_version": 1}))


class DistWriter(CheckpointWriter):
    """Each rank its own ``.distcp`` file and index part; :meth:`finish` merges the parts."""

    name = BACKEND

    def write_rank(self, root: Path, layout: ShardLayout, tp_rank: int, pp_rank: int,
                   model: Mapping[str, Any], iteration: int,
                   extra_args: Optional[dict] = None) -> Path:
        return write_dist_rank(Path(root) / iteration_dir_name(iteration), layout, tp_rank,
                               pp_rank, model)

    def write_pp_stage(self, root: Path, layout: ShardLayout, pp_rank: int, tp_ranks: Sequence[int],
                    tensors: StageTensors, iteration: int, extra_args: Optional[dict],
                    written: Callable[[int, int], None], checksums: bool = False) -> None:
        """Rank by rank, each tensor produced when :func:`write_dist_rank` takes it."""
        names = [p.local_name for p in layout.pp_stage_params(pp_rank)]
        for tp_rank in tp_ranks:
            stream = ((name, materialized(shards.pop())) for name, shards in tensors([tp_rank]))

            def produce(expected: str, tp_rank=tp_rank, stream=stream):
                def next_tensor() -> torch.Tensor:
                    name, shard = next(stream)
                    assert name == expected, (name, expected)  # the writer walks in order
                    written(tp_rank, shard.numel() * shard.element_size())
                    return shard
                return next_tensor

            self.write_rank(root, layout, tp_rank, pp_rank,
                            {name: LazyTensor(produce(name)) for name in names}, iteration)
            next(stream, None)  # run the generator to its end

    def finish(self, root: Path, layout: ShardLayout, iteration: int,
               extra_args: Optional[dict] = None) -> None:
        finalize_dist(Path(root) / iteration_dir_name(iteration), layout, iteration, extra_args)
