"""Every private API of torch and submitit that mlmega relies on, in one place.

tests/test_compat.py checks each of them on the installed versions; pyproject admits only the
versions they were checked on (torch 2.13 by the tests, 2.11 by its sources; torch 2.4 lacks the
zip writer's alignment and record-metadata calls). submitit and torch.distributed.checkpoint are
imported when first used (``mlmega --help`` stays fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch._utils import _rebuild_tensor_v2 as rebuild_tensor_v2  # pickled by name
from torch._utils import _rebuild_tensor_v3 as rebuild_tensor_v3  # pickled by name

__all__ = ["PyTorchFileWriter", "chunk_read_items", "make_sbatch_string",
           "read_items", "rebuild_tensor_v2", "rebuild_tensor_v3", "storage_alignment",
           "slurm_executor_running", "storage_info", "storage_key", "submitit_main",
           "typed_storage_name", "typed_storage_parts", "uses_untyped_storage"]

# -- torch.save's zip writer and storage pickling (checkpoint/streaming.py) ------------------------
PyTorchFileWriter = torch._C.PyTorchFileWriter  # (file-like sink, crc32: bool, alignment: int)


def storage_alignment() -> int:
    """The record alignment torch.save uses (64 bytes)."""
    return torch.serialization._get_storage_alignment()


def uses_untyped_storage(dtype: torch.dtype) -> bool:
    """Whether ``Tensor.__reduce_ex__`` pickles ``dtype`` with _rebuild_tensor_v3 and an
    UntypedStorage (dtypes newer than the typed storages), rather than v2 and a typed storage."""
    return dtype in torch.storage._new_dtypes()


def typed_storage_name(dtype: torch.dtype) -> str:
    """The legacy typed storage class of ``dtype`` (e.g. "FloatStorage")."""
    return torch.storage._dtype_to_storage_type_map()[dtype]


def typed_storage_parts(item: torch.storage.TypedStorage) -> tuple[torch.UntypedStorage, Any, int]:
    """(untyped storage, storage class to pickle, element count) as torch.serialization._save
    takes them from a TypedStorage."""
    return item._untyped_storage, getattr(torch, item._pickle_storage_type()), item._size()


def storage_key(storage: torch.UntypedStorage) -> int:
    """An identity of the storage's underlying buffer (torch.save's key for sharing)."""
    return storage._cdata


# -- torch.distributed.checkpoint (checkpoint/dist_format.py) -------------------------------------
def storage_info(relative_path: str, offset: int, length: int):
    """FileSystemWriter's record of where a chunk is stored (its ``storage_data``)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return _StorageInfo(relative_path, offset, length)


def chunk_read_items(key: str, metadata, offsets: Sequence[int], sizes: Sequence[int]) -> list:
    """The read items (one per stored chunk overlapping it) of block [offsets, offsets + sizes)
    of tensor ``key`` (``metadata``: its TensorStorageMetadata)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    return create_read_items_for_chunk_list(
        key, metadata, [ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))])


def read_items(reader, items: list, out: torch.Tensor) -> None:
    """Copy the chunks ``items`` (of one file) into their places in ``out`` with the reader's
    ``read_data``, which calls only these three methods of its planner."""
    from torch.distributed.checkpoint.planner import LoadPlan

    reader.read_data(LoadPlan(items), _RegionPlanner(out)).wait()


class _RegionPlanner:
    """The part of a LoadPlanner that FileSystemReader.read_data calls: each read chunk goes into
    its place in ``out`` (which covers the requested region only)."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def resolve_tensor(self, read_item) -> torch.Tensor:
        view = self.out
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass

    def load_bytes(self, read_item, value) -> None:  # only tensors are read
        raise AssertionError(f"unexpected byte item {read_item.storage_index.fqn}")


# -- submitit (launch/sbatch.py) -------------------------------------------------------------------
def slurm_executor_running(command: Callable[[Path, str], str]) -> type:
    """submitit's SlurmExecutor whose tasks run ``command(folder, python)`` under srun (its
    private ``_submitit_command_str``)."""
    import submitit

    class Executor(submitit.SlurmExecutor):
        @property
        def _submitit_command_str(self) -> str:
            return command(self.folder, self.python)

    return Executor


def submitit_main() -> None:
    """What ``python -m submitit.core._submit FOLDER`` runs: unpickle and run the job."""
    from submitit.core.submission import submitit_main as run

    run()


def make_sbatch_string(**parameters: Any) -> str:
    """The sbatch script submitit's SlurmExecutor submits for ``parameters``."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(**parameters)
