"""Bounded-memory ``torch.save``: write a checkpoint file tensor by tensor.

``torch.save`` pickles the whole object first and writes the storages after, so everything it saves
is in memory at once. :func:`save_streaming` writes the same zip archive (torch 2.x format, through
torch's own ``PyTorchFileWriter``: 64-byte aligned records, CRC32 as ``torch.save`` is configured,
top directory ``archive/`` as torch.save to a file object names it)
in the other order: each tensor's storage record ``data/<key>`` is written as soon as the tensor
exists, and the tensor is dropped; ``data.pkl`` (the pickle, whose persistent ids reference the
written storages) and the small ``.format_version`` / ``.storage_alignment`` / ``byteorder`` /
``version`` / ``.data/serialization_id`` records come last. The pickle is byte for byte the one
``torch.save`` writes for the same object (tests check this); readers find records by name, so
plain ``torch.load(path, weights_only=True, mmap=...)`` and Megatron's loaders read the file
unchanged.

Tensors in the object's dicts, lists and tuples may be :class:`LazyTensor` producers: each is
called when the writer reaches it, so at most one produced tensor is alive at a time; and
:meth:`StreamingWriter.write_tensor` takes :class:`RowBlocks`, a tensor made block by block of rows
as its record is written. Without CRC32s a record's data goes from the tensors to the file
(torch's writer writes the header and skips the data, which the file sink fills). Each tensor is
written compactly (its own elements in contiguous order; a view does not drag its base's storage
along, unlike ``torch.save``). Each tensor record's xxh3 hash is taken on the way and written to
the file's checksum manifest (:mod:`mlmega.checkpoint.integrity`), as are the pickle's and those
of the storages written after it. Tensors elsewhere (inside other objects) and tensor subclasses
such as ``nn.Parameter`` are handled as ``torch.save`` handles them: pickled by torch's own reducers
and their storages written after the pickle.

:func:`reuse_freed_memory` makes a process that streams tensors reuse freed ones' memory.
"""

from __future__ import annotations

import collections
import ctypes
import io
import math
import os
import pickle
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Optional

import torch

from mlmega import compat
from mlmega.checkpoint.integrity import new_hash, write_manifest, zip_records
from mlmega.checkpoint.records import byte_view
from mlmega.config.errors import CheckpointError

__all__ = ["LazyTensor", "RowBlocks", "StreamingWriter", "materialized", "save_streaming",
           "reuse_freed_memory"]


class LazyTensor:
    """A tensor the writer computes when it reaches it; ``release`` runs after it is written."""

    __slots__ = ("produce", "release")

    def __init__(self, produce: Callable[[], torch.Tensor],
                 release: Optional[Callable[[], None]] = None):
        self.produce, self.release = produce, release

    def __repr__(self) -> str:
        return f"LazyTensor({self.produce!r})"


class RowBlocks:
    """A contiguous tensor of ``shape`` and ``dtype`` given as consecutive blocks of its rows
    (dim 0), each made when the writer reaches it: the writer streams them into one record, so the
    whole tensor is never in memory (unless :meth:`materialize` makes it)."""

    __slots__ = ("shape", "dtype", "blocks")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype,
                 blocks: Callable[[], Iterable[torch.Tensor]]):
        self.shape, self.dtype, self.blocks = tuple(shape), dtype, blocks

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def materialize(self) -> torch.Tensor:
        """The whole tensor, in fresh memory."""
        out, row = torch.empty(self.shape, dtype=self.dtype), 0
        for block in self.blocks():
            out.narrow(0, row, block.shape[0]).copy_(block)
            row += block.shape[0]
        if row != self.shape[0]:
            raise RuntimeError(f"row blocks gave {row} rows, expected {self.shape[0]}")
        return out


def materialized(shard: "torch.Tensor | RowBlocks") -> torch.Tensor:
    """``shard`` as one tensor (row blocks made whole)."""
    return shard.materialize() if isinstance(shard, RowBlocks) else shard


class _StorageRef:
    """A storage already written as record ``data/<key>`` (pickled as torch's persistent id)."""

    __slots__ = ("pid",)

    def __init__(self, storage_type, key: str, location: str, numel: int):
        self.pid = ("storage", storage_type, key, location, numel)


class _WrittenTensor:
    """Stand-in for a written tensor: pickles exactly as ``Tensor.__reduce_ex__`` would."""

    __slots__ = ("reduced", "nbytes", "dtype")

    def __init__(self, reduced: tuple, nbytes: int, dtype: torch.dtype):
        self.reduced, self.nbytes, self.dtype = reduced, nbytes, dtype

    def __reduce_ex__(self, protocol):
        return self.reduced


class _FileSink:
    """The stream PyTorchFileWriter writes to. Given a file name, torch's writer holds the GIL while
    it writes a record; through this sink ``os.write`` releases it while the kernel copies, so
    another thread (producing the next tensor) runs meanwhile. Takes any path (torch's: ASCII).

    Records go out in pieces of ``_WRITE_PIECE`` bytes, the fastest and steadiest size measured
    (docs/performance-notes.md).

    An exception must not cross torch's C++ writer (it would lose count of its position and abort
    the process when it is destroyed): the sink keeps the first one as ``failure``, which
    :meth:`check` raises once the writer's call has returned, and writes nothing more.
    """

    def __init__(self, target: Path | BinaryIO):
        owned = isinstance(target, (str, Path))
        self._file = open(target, "wb", buffering=0) if owned else target  # noqa: SIM115
        self._owned = owned  # a borrowed file (a blob appended to it) is left open
        self.name = str(target if owned else target.name)
        self._skipped: Optional[Iterable[torch.Tensor]] = None
        self._hash = None
        self.position = 0  # bytes written through this sink
        self.failure: Optional[BaseException] = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            done = 0
            while done < len(view) and self.failure is None:
                done += self._file.write(view[done:done + _WRITE_PIECE])
        except BaseException as exc:  # noqa: BLE001 (raised by check())
            self.failure = self.failure or exc
        self.position += len(view)
        return len(view)

    def fill_next_skip(self, pieces: Iterable[torch.Tensor], hasher) -> None:
        """Write ``pieces`` (contiguous tensors) where the zip writer next skips a record's data
        (``write_record_metadata`` writes the record's header, then seeks past its data), and
        hash them with ``hasher`` on the way."""
        self._skipped, self._hash = pieces, hasher

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        pieces, self._skipped = self._skipped, None
        try:
            if whence != os.SEEK_CUR or pieces is None:
                raise io.UnsupportedOperation("the zip writer seeks only past data given to it")
            done = 0
            for piece in pieces:
                if self.failure is not None:
                    break
                data = byte_view(piece)
                self._hash.update(data)
                done += self.write(data)
            if done != offset and self.failure is None:
                raise RuntimeError(f"{self._file.name}: a record's pieces hold {done} bytes, "
                                   f"its header says {offset}")
        except BaseException as exc:  # noqa: BLE001 (raised by check())
            self.failure = self.failure or exc
        return offset

    def check(self) -> None:
        """Raise the exception a write met, if any (a failed write, e.g. a full disk, as a
        one-line CheckpointError naming the file)."""
        if isinstance(self.failure, OSError):
            raise CheckpointError(f"{self.name}: cannot write "
                                  f"({self.failure.strerror or self.failure})") from None
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        if self._owned:
            self._file.close()


_WRITE_PIECE = 256 * 1024


class StreamingWriter:
    """Write one torch-format file incrementally: :meth:`write_tensor` ..., then :meth:`finish`.

    Use as a context manager; on an exception the partial file is removed. ``checksums``: whether
    to store each record's zip CRC32 (None: as torch.save is configured). torch.load never checks
    them, and computing them is the writer's main cost (docs/performance-notes.md).
    Whatever ``checksums`` says, every tensor record's xxh3 hash is taken as it is written
    (:mod:`mlmega.checkpoint.integrity`), and the pickle's: :meth:`finish` writes them to the
    file's manifest.

    ``target``: a path, or an open unbuffered binary file to append one archive to (a blob in a
    larger file, as torch.distributed.checkpoint stores tensors; :meth:`checksum_records` then
    gives its records' hashes, and nothing is removed on error).
    """

    def __init__(self, target: str | Path | BinaryIO, pickle_protocol: int = 2,
                 checksums: Optional[bool] = None):
        owned = isinstance(target, (str, Path))
        self.path = Path(target if owned else target.name)
        self._base = 0 if owned else target.tell()
        self.protocol = pickle_protocol
        self._crc32 = torch.serialization.get_crc32_options() if checksums is None else checksums
        self._stream = _FileSink(self.path if owned else target)
        self._zip = compat.PyTorchFileWriter(self._stream, self._crc32,
                                             compat.storage_alignment())
        self._keys = 0
        self._written: dict[int, tuple[torch.Tensor, _WrittenTensor]] = {}  # id -> same object
        self._hashes: dict[str, str] = {}  # record name -> xxh3 hex of its data
        self.bytes_written = 0
        self.finished = False

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.finished:
            self.abort()

    def abort(self) -> None:
        """Close and delete the partial file (a borrowed file: left to its owner)."""
        self._zip = None
        self._stream.close()
        if self._stream._owned:
            self.path.unlink(missing_ok=True)

    # -- records -----------------------------------------------------------------------------
    def _next_key(self) -> str:
        key = str(self._keys)
        self._keys += 1
        return key

    def _write_record(self, data: torch.Tensor | RowBlocks) -> str:
        """Write ``data`` (a contiguous tensor, or row blocks) as the next storage record; returns
        its key. Without checksums the bytes go from the tensors to the file (torch's writer
        writes the header and skips the data, which the sink fills); with them, through torch's
        writer, which computes the CRC32 over the whole record in memory."""
        key, nbytes, hasher = self._next_key(), data.nbytes, new_hash()
        if nbytes and not self._crc32:
            self._stream.fill_next_skip(data.blocks() if isinstance(data, RowBlocks) else [data],
                                        hasher)
            self._zip.write_record_metadata(f"data/{key}", nbytes)
        elif nbytes:
            tensor = data.materialize() if isinstance(data, RowBlocks) else data
            if tensor.storage_offset() or tensor.untyped_storage().nbytes() != nbytes:
                tensor = tensor.clone()  # a view: the record holds its own elements only
            hasher.update(byte_view(tensor))
            self._zip.write_record(f"data/{key}", tensor.untyped_storage(), nbytes)
        else:
            self._zip.write_record(f"data/{key}", b"", 0)
        self._stream.check()
        self._hashes[f"data/{key}"] = hasher.hexdigest()
        self.bytes_written += nbytes
        return key

    def write_tensor(self, tensor: torch.Tensor | RowBlocks, remember: bool = True) -> Any:
        """Write ``tensor``'s data now; returns what to put in the object in its place.

        ``remember``: keep the tensor alive so that meeting the same object again writes no second
        record (as torch.save); False for tensors produced once, which are then freed as soon as
        the caller drops them. Row blocks are written as the tensor they make up.
        """
        if isinstance(tensor, RowBlocks):
            key = self._write_record(tensor)
            stride = torch.empty(tensor.shape, device="meta").stride()
            return _written(key, "cpu", tensor.shape, stride, False, tensor.dtype, tensor.nbytes)
        if (type(tensor) is not torch.Tensor or tensor.layout != torch.strided
                or tensor.is_quantized or tensor.device.type == "meta"):
            return tensor  # subclasses (nn.Parameter...), sparse...: torch's own reducers
        seen = self._written.get(id(tensor))
        if seen is not None and seen[0] is tensor:  # the same object twice: one record, as torch
            return seen[1]
        original = tensor
        location = torch.serialization.location_tag(tensor.untyped_storage())
        tensor = tensor.detach().resolve_conj().resolve_neg()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        key = self._write_record(tensor)
        written = _written(key, location, tuple(tensor.size()), tensor.stride(),
                           original.requires_grad, tensor.dtype, tensor.nbytes)
        if remember:  # keeping it alive, so its id stays its own, to write it once only
            self._written[id(original)] = (original, written)
        return written

    def _write_value(self, value: Any) -> Any:
        """``value`` with its tensors (and lazy tensors) written and replaced by stand-ins."""
        if isinstance(value, LazyTensor):
            tensor = value.produce()
            written = self.write_tensor(tensor, remember=False)  # never seen again: free it
            del tensor
            if value.release is not None:
                value.release()
            return written
        if isinstance(value, torch.Tensor):
            return self.write_tensor(value)
        if type(value) in (dict, collections.OrderedDict):
            return type(value)((k, self._write_value(v)) for k, v in value.items())
        if type(value) is list:
            return [self._write_value(v) for v in value]
        if type(value) is tuple:
            return tuple(self._write_value(v) for v in value)
        return value

    def finish(self, obj: Any) -> int:
        """Write ``obj``'s remaining tensors, its pickle and the trailing records; returns bytes."""
        obj = self._write_value(obj)
        self._written.clear()
        late: dict[str, torch.UntypedStorage] = {}  # storages met only while pickling
        late_ids: dict[int, str] = {}
        dtypes: dict[int, torch.dtype] = {}

        def persistent_id(item):
            if isinstance(item, _StorageRef):
                return item.pid
            if isinstance(item, torch.storage.TypedStorage) or torch.is_storage(item):
                # exactly torch.serialization._save's handling
                if isinstance(item, torch.storage.TypedStorage):
                    storage, storage_type, numel = compat.typed_storage_parts(item)
                    dtype = item.dtype
                else:
                    storage, dtype = item, torch.uint8
                    storage_type = torch.serialization.normalize_storage_type(type(item))
                    numel = storage.nbytes()
                if storage.data_ptr() != 0:
                    if dtypes.setdefault(storage.data_ptr(), dtype) != dtype:
                        raise RuntimeError("Cannot save multiple tensors or storages that view "
                                           "the same data as different types")
                key = late_ids.get(compat.storage_key(storage))
                if key is None:
                    key = late_ids[compat.storage_key(storage)] = self._next_key()
                    late[key] = storage
                return ("storage", storage_type, key, torch.serialization.location_tag(storage),
                        numel)
            return None

        class Pickler(pickle.Pickler):
            def persistent_id(self, item):
                return persistent_id(item)

        buffer = io.BytesIO()
        Pickler(buffer, protocol=self.protocol).dump(obj)
        data = buffer.getvalue()
        zf = self._zip
        zf.write_record("data.pkl", data, len(data))
        self._hashes["data.pkl"] = new_hash(data).hexdigest()
        zf.write_record(".format_version", "1", len("1"))
        alignment = str(compat.storage_alignment())
        zf.write_record(".storage_alignment", alignment, len(alignment))
        zf.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for key, storage in late.items():
            if storage.device.type != "cpu":
                storage = storage.cpu()
            zf.write_record(f"data/{key}", storage, storage.nbytes())
            self._hashes[f"data/{key}"] = new_hash(
                byte_view(torch.empty(0, dtype=torch.uint8).set_(storage))).hexdigest()
            self.bytes_written += storage.nbytes()
        zf.write_end_of_file()
        self._stream.check()
        self._stream.close()
        if self._stream._owned:
            write_manifest(self.path, self.checksum_records())
        self.finished = True
        return self.bytes_written

    def checksum_records(self) -> list[tuple[int, int, str]]:
        """(offset in the file, length, xxh3 hex) of every storage record and of the pickle
        (the archive must be complete: offsets come from its directory)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            records = zip_records(fd, self._base, self._stream.position)
        finally:
            os.close(fd)
        return [(records[name].offset, records[name].length, digest)
                for name, digest in self._hashes.items()]


def _written(key: str, location: str, shape: tuple, stride: tuple, requires_grad: bool,
             dtype: torch.dtype, nbytes: int) -> _WrittenTensor:
    """The stand-in for a tensor written as record ``data/<key>``, as ``Tensor.__reduce_ex__``
    reduces it."""
    hooks = collections.OrderedDict()
    if compat.uses_untyped_storage(dtype):
        ref = _StorageRef(torch.UntypedStorage, key, location, nbytes)
        reduced = (compat.rebuild_tensor_v3,
                   (ref, 0, shape, stride, requires_grad, hooks, dtype))
    else:
        storage_type = getattr(torch, compat.typed_storage_name(dtype))
        ref = _StorageRef(storage_type, key, location, nbytes // dtype.itemsize)
        reduced = (compat.rebuild_tensor_v2, (ref, 0, shape, stride, requires_grad, hooks))
    return _WrittenTensor(reduced, nbytes, dtype)


def save_streaming(obj: Any, path: str | Path, checksums: Optional[bool] = None) -> int:
    """``torch.save(obj, path)`` in bounded memory (see the module doc); returns tensor bytes."""
    with StreamingWriter(path, checksums=checksums) as writer:
        return writer.finish(obj)


# -- reusing freed tensor memory ------------------------------------------------------------------
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_HEAP_BLOCKS_BELOW = 32 << 20  # the largest mmap threshold glibc accepts (64-bit)


def reuse_freed_memory() -> None:
    """Make glibc reuse freed tensor memory predictably (process-wide; a no-op off glibc).

    Blocks under 32 MiB (a transformer layer's tensors) come from the heap, and the heap is not
    trimmed: the next tensors reuse freed blocks without page faults, and RSS stays at the
    high-water mark of live tensors. Larger blocks are mmapped and given back when freed. (glibc's
    default moves its mmap threshold up as large blocks are freed, so which tensors cost fresh,
    page-faulting memory would depend on the order they come in.)
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None)
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS_BELOW)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)
        except (OSError, AttributeError):  # not glibc
            pass
