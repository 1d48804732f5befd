"""Read tensors loaded with ``torch.load(mmap=True)`` by ``pread``, not through the map.

``torch.load(mmap=True)`` maps a whole file and gives tensors that view its records: metadata for
free, but touching their data costs a page fault per few pages and leaves the pages counted in the
process's RSS. :class:`RecordFile` finds where a loaded tensor's bytes lie in the file (its address
minus the start of the file's mapping) and reads them with ``preadv`` straight into a destination
tensor: one kernel copy, no page faults, nothing of the file resident. Off Linux, or for a tensor
outside a mapping of the file, it copies from the mapped tensor instead (same values).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch

from mlmega.checkpoint.integrity import RecordChecks
from mlmega.checkpoint.errors import CheckpointError

__all__ = ["RecordFile", "byte_view", "file_mappings"]


def file_mappings(path: str | Path) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of this process's mappings of ``path`` (from /proc/self/maps)."""
    if not sys.platform.startswith("linux"):
        return []
    name, out = os.path.realpath(path), []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.rstrip("\n").split(maxsplit=5)
            if len(parts) == 6 and parts[5] == name:
                start, end = parts[0].split("-")
                out.append((int(start, 16), int(end, 16), int(parts[2], 16)))
    return out


def byte_view(tensor: torch.Tensor):
    """A writable byte buffer over contiguous ``tensor`` (any dtype, bfloat16 included)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


class RecordFile:
    """One torch-format file whose tensors were loaded with mmap: reads their bytes by offset,
    each record's checksum verified before its first read (unless ``checks`` is None)."""

    def __init__(self, path: str | Path, checks: Optional[RecordChecks] = None):
        self.path = Path(path)
        self.checks = checks
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed when collected)
        self._size = os.fstat(self._file.fileno()).st_size
        self._mappings = file_mappings(self.path)  # taken after torch.load mapped the file

    def offset(self, tensor: torch.Tensor) -> int | None:
        """Where contiguous mmapped ``tensor``'s bytes start in the file; None if not known."""
        if not tensor.is_contiguous():
            return None
        first = tensor.data_ptr()
        nbytes = tensor.numel() * tensor.element_size()
        for start, end, file_offset in self._mappings:
            if start <= first and first + nbytes <= end:
                offset = first - start + file_offset
                return offset if offset + nbytes <= self._size else None
        return None

    def read_into(self, out: torch.Tensor, tensor: torch.Tensor) -> None:
        """Fill ``out`` (any view) with the values of mmapped ``tensor``, reshaped to ``out``'s."""
        offset = self.offset(tensor) if tensor.numel() else None
        if offset is None:
            out.copy_(tensor.reshape(out.shape))
            return
        whole = None  # an unverified record read whole: checked from the bytes read
        if self.checks is not None:
            nbytes = tensor.numel() * tensor.element_size()
            whole = self.checks.unverified(offset, nbytes)
            if whole is None:
                self.checks.check(offset, nbytes)
        direct = out.is_contiguous() and out.dtype == tensor.dtype
        dest = out if direct else torch.empty(out.shape, dtype=tensor.dtype)
        view = memoryview(byte_view(dest))
        done = 0
        while done < len(view):  # one read moves at most ~2 GiB
            n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if n == 0:
                raise CheckpointError(f"{self.path}: file ends inside a tensor record (truncated?)")
            done += n
        if whole is not None:
            self.checks.confirm(whole, [view])
        if not direct:
            out.copy_(dest)
