"""Record checksums: written next to every data file mlmega writes, checked before bytes are used.

mlmega writes its torch-format records without zip CRC32s (computing them is the writer's main
cost, see :mod:`mlmega.checkpoint.streaming`); instead every data file ``F`` it writes gets a
manifest ``F.mlmega-checksums.json``: the byte range and xxh3-64 hash of each record (tensor
storages and the pickle; a plain pickle file is one record). xxh3 hashes at memory speed, several
times zlib's CRC32. Files without a manifest (``torch.save``'s, Megatron-LM's,
torch.distributed.checkpoint's) are checked against their zip CRC32s where they have them.
:class:`RecordChecks` checks a record in full once per process, before the first read of any of its
bytes, so a damaged record is an error, never a converted value.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
import xxhash

from mlmega.config.errors import CheckpointError

MANIFEST_SUFFIX = ".mlmega-checksums.json"
ALGORITHM = "xxh3_64"
_PIECE = 8 << 20  # bytes hashed per read while checking


def manifest_path(data_file: Path) -> Path:
    return data_file.with_name(data_file.name + MANIFEST_SUFFIX)


def new_hash(data=b""):
    """A streaming hash of the manifest's algorithm (``update(buffer)``, ``hexdigest()``), fed
    ``data`` first."""
    return xxhash.xxh3_64(data)


def write_manifest(data_file: Path, records: Iterable[tuple[int, int, str]]) -> None:
    """Write ``data_file``'s manifest: (offset, length, xxh3-64 hex) of each record."""
    text = json.dumps({"algorithm": ALGORITHM, "records": sorted(records)})
    path = manifest_path(data_file)
    try:
        path.write_text(text)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot write ({err.strerror or err})") from None


def write_file_manifest(path: Path) -> None:
    """The manifest of a plain file (a pickle, not a zip): the whole file as one record."""
    with open(path, "rb") as file:
        data = file.read()
    write_manifest(path, [(0, len(data), new_hash(data).hexdigest())])


@dataclass(frozen=True)
class ZipRecord:
    offset: int  # of the record's data, in the file
    length: int
    crc32: int


class _FileSlice(io.RawIOBase):
    """Bytes [base, base + length) of an open file, as a seekable stream (a zip inside a file)."""

    def __init__(self, fd: int, base: int, length: int):
        self.fd, self.base, self.length, self.pos = fd, base, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        start = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence]
        self.pos = max(0, start + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.length - self.pos))
        data = os.pread(self.fd, count, self.base + self.pos)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def zip_records(fd: int, base: int, length: int) -> dict[str, ZipRecord]:
    """The records of the zip at bytes [base, base + length) of open file ``fd``: name (without
    the archive's top directory) -> where its data lies in the file, and its stored CRC32."""
    stream = _FileSlice(fd, base, length)
    out = {}
    with zipfile.ZipFile(io.BufferedReader(stream)) as archive:
        for info in archive.infolist():
            header = os.pread(fd, 30, base + info.header_offset)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"no local header for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            offset = base + info.header_offset + 30 + name_len + extra_len
            out[info.filename.split("/", 1)[-1]] = ZipRecord(offset, info.file_size, info.CRC)
    return out


@dataclass(frozen=True, order=True)
class _Expected:
    offset: int
    length: int
    value: str  # xxh3-64 hex digest, or the CRC32 as 8 hex digits
    algorithm: str


CONTAINERS = ("zip", "blobs", "file")


@dataclass(frozen=True)
class StoredFile:
    """One file of a checkpoint, as :class:`RecordChecks` reads it: its container and, in a
    ``blobs`` file, the (offset, length) of each tensor's archive."""

    path: Path
    container: str = "zip"
    blobs: tuple[tuple[int, int], ...] = ()


class RecordChecks:
    """The checksummed records of one data file; :meth:`check` verifies those a byte range touches.

    ``container``: ``zip``, one torch archive; ``blobs``, a sequence of zips (a
    torch.distributed.checkpoint ``.distcp``: without a manifest, the zip around a checked range is
    parsed when that range is first checked); ``file``, a plain file (a pickle: only a manifest
    has checksums for it).
    """

    def __init__(self, path: Path, container: str = "zip"):
        assert container in CONTAINERS, container
        self.path, self.container = Path(path), container
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file is missing") from None
        self._lock = threading.Lock()
        self._records: list[_Expected] = []
        self._done: set[int] = set()  # offsets of verified records
        self._parsed: set[int] = set()  # blob offsets whose zip CRCs are known
        self._names: Optional[dict[str, ZipRecord]] = None  # a zip file's records, parsed once
        manifest = manifest_path(self.path)
        self.has_manifest = manifest.is_file()
        if self.has_manifest:
            try:
                data = json.loads(manifest.read_text())
                self._records = sorted(_Expected(int(o), int(n), str(v), data["algorithm"])
                                       for o, n, v in data["records"])
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{manifest}: not a checksum manifest "
                                      f"({type(err).__name__}: {err})") from None
            if data["algorithm"] != ALGORITHM:
                raise CheckpointError(f"{manifest}: algorithm={data['algorithm']!r}, expected "
                                      f"{ALGORITHM!r}")
        elif container == "zip":
            self._add_zip(0, os.fstat(self._fd).st_size)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def _add_zip(self, base: int, length: int) -> None:
        """Expect the CRC32s the zip at [base, base + length) stores (0 on a record: not stored)."""
        self._parsed.add(base)
        records = self._whole_zip() if self.container == "zip" else self._zip_records(base, length)
        for record in records.values():
            if record.crc32 and record.length:
                bisect.insort(self._records, _Expected(record.offset, record.length,
                                                        f"{record.crc32:08x}", "crc32"))

    def _expect_blob(self, offset: int, length: int) -> None:
        """In a ``blobs`` file without a manifest: expect the CRC32s of the zip at [offset,
        offset + length), parsed once."""
        if self.container == "blobs" and not self.has_manifest and offset not in self._parsed:
            self._add_zip(offset, length)

    def check(self, offset: int, length: int) -> None:
        """Verify (once) every checksummed record overlapping bytes [offset, offset + length)."""
        with self._lock:
            self._expect_blob(offset, length)
            i = max(bisect.bisect_right(self._records, offset, key=_offset) - 1, 0)
            while i < len(self._records) and self._records[i].offset < offset + length:
                record = self._records[i]
                if record.offset + record.length > offset and record.offset not in self._done:
                    self.confirm(record, self._pieces(record))
                i += 1

    def _zip_records(self, base: int, length: int) -> dict[str, ZipRecord]:
        try:
            return zip_records(self._fd, base, length)
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise CheckpointError(f"{self.path}: bytes {base}..{base + length} are not a zip "
                                  f"archive ({err}); the file is damaged or truncated") from None

    def _whole_zip(self) -> dict[str, ZipRecord]:
        """The records of a ``zip`` file, its directory parsed on first use only."""
        if self._names is None:
            self._names = self._zip_records(0, os.fstat(self._fd).st_size)
        return self._names

    def check_record(self, name: str) -> None:
        """Verify record ``name`` of a ``zip`` file (e.g. ``data.pkl``), if it is checksummed."""
        record = self._whole_zip().get(name)
        if record is not None:
            self.check(record.offset, record.length)

    def check_all(self, blob_ranges: Iterable[tuple[int, int]] = (),
                  checked: Callable[[int], None] = lambda nbytes: None) -> tuple[int, int]:
        """Verify every checksummed record, calling ``checked(length)`` after each; returns
        (records, bytes) verified. ``blob_ranges``: the (offset, length) of each zip of a
        ``blobs`` file (their CRC32s are the checksums where there is no manifest)."""
        with self._lock:
            for offset, length in blob_ranges:
                self._expect_blob(offset, length)
            for record in self._records:
                if record.offset not in self._done:
                    self.confirm(record, self._pieces(record))
                checked(record.length)
        return len(self._records), sum(r.length for r in self._records)

    def unverified(self, offset: int, length: int) -> Optional[_Expected]:
        """The unverified record that is exactly bytes [offset, offset + length), if any: a
        reader that reads it whole confirms it from what it read (:meth:`confirm`), instead of
        :meth:`check` reading it once more."""
        with self._lock:
            i = bisect.bisect_left(self._records, offset, key=_offset)
            if i < len(self._records) and self._records[i].offset == offset \
                    and self._records[i].length == length and offset not in self._done:
                return self._records[i]
        return None

    def confirm(self, record: _Expected, pieces: Iterable) -> None:
        """Check ``record`` against its bytes given as ``pieces`` (buffers, in order)."""
        crc, hasher = 0, new_hash()
        for piece in pieces:
            if record.algorithm == "crc32":
                crc = zlib.crc32(piece, crc)
            else:
                hasher.update(piece)
        found = f"{crc:08x}" if record.algorithm == "crc32" else hasher.hexdigest()
        if found != record.value:
            rewritten = f" (or was rewritten without its {manifest_path(self.path).name})" \
                if record.algorithm == ALGORITHM else ""
            raise CheckpointError(f"{self.path}: the {record.length}-byte record at byte "
                                  f"{record.offset} fails its {record.algorithm} check (stored "
                                  f"{record.value}, read {found}): the file is damaged{rewritten}")
        self._done.add(record.offset)

    def _pieces(self, record: _Expected) -> Iterator[bytes]:
        """The bytes of ``record``, read from the file piece by piece."""
        done = 0
        while done < record.length:
            piece = os.pread(self._fd, min(_PIECE, record.length - done), record.offset + done)
            if not piece:
                raise CheckpointError(f"{self.path}: file ends inside the record at byte "
                                      f"{record.offset} (truncated?)")
            done += len(piece)
            yield piece


def _offset(record: _Expected) -> int:
    return record.offset


def check_finite(tensor: torch.Tensor, where: str) -> None:
    """CheckpointError unless every value of ``tensor`` (read from ``where``) is finite."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{where}: {bad} of {tensor.numel()} values are NaN or Inf "
                              f"(--check-finite)")
