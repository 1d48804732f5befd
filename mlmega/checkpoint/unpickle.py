"""Restricted unpickling of torch.distributed.checkpoint's ``.metadata``: data classes only.

torch's ``FileSystemReader.read_metadata`` reads ``.metadata`` with plain ``pickle.load``, which
runs whatever callable the pickle names (``eval``, ``os.system``...). :func:`load_dist_metadata`
reads it with an unpickler that resolves only the globals of :data:`DIST_METADATA_GLOBALS` (the
metadata data classes and the torch types they hold) and refuses anything else before calling it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from mlmega.checkpoint.errors import CheckpointError

_METADATA = "torch.distributed.checkpoint.metadata"
_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
           "uint8", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2")
# What torch (2.x) and megatron-core write into ``.metadata``: data classes and enums, none of
# which runs code when it is made.
DIST_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {(_METADATA, name) for name in ("Metadata", "MetadataIndex", "StorageMeta",
                                    "TensorStorageMetadata", "BytesStorageMetadata",
                                    "ChunkStorageMetadata", "TensorProperties",
                                    "_MEM_FORMAT_ENCODING")}
    # megatron-core also stores every rank's save plan (``all_local_plans``), and older versions
    # its own (empty) plan and metadata classes
    | {("torch.distributed.checkpoint.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")}
    | {("megatron.core.dist_checkpointing.strategies.torch", name)
       for name in ("MCoreSavePlan", "MCoreMetadata")}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
       ("torch", "Size"), ("torch", "device"), ("torch.serialization", "_get_layout"),
       ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
       ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}
    | {("torch", dtype) for dtype in _DTYPES})


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``allowed`` (module, name) globals; anything else (and any
    persistent id) raises CheckpointError naming ``path`` and the refused global."""

    def __init__(self, file, path: Path, allowed: frozenset[tuple[str, str]]):
        super().__init__(file)
        self.path, self.allowed = path, allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise CheckpointError(f"{self.path}: refused to load global {module}.{name} (not a "
                                  f"torch.distributed.checkpoint metadata type); the file is "
                                  f"damaged or unsafe")
        return super().find_class(module, name)

    def persistent_load(self, pid) -> Any:
        raise CheckpointError(f"{self.path}: refused a persistent id {pid!r} (not expected in "
                              f"checkpoint metadata)")


def load_dist_metadata(path: Path):
    """The torch.distributed.checkpoint ``Metadata`` in ``path``, unpickled with the allow-list."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    with open(path, "rb") as file:
        try:
            metadata = RestrictedUnpickler(file, path, DIST_METADATA_GLOBALS).load()
        except CheckpointError:
            raise
        except Exception as err:  # truncated or garbled pickles
            raise CheckpointError(f"{path}: cannot read the checkpoint index "
                                  f"({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, expected a "
                              f"torch.distributed.checkpoint Metadata")
    if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata
        metadata.storage_meta = StorageMeta()
    return metadata
