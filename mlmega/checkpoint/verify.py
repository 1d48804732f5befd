"""A whole checkpoint checked: every checksummed byte, not only those a conversion reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mlmega.checkpoint.formats import open_checkpoint
from mlmega.checkpoint.integrity import RecordChecks
from mlmega.progress import Progress


@dataclass(frozen=True)
class FileCheck:
    """What was verified in one file of a checkpoint."""

    path: Path
    size: int  # the file's bytes
    records: int  # its checksummed records (0: the file has no checksums)
    checked_bytes: int  # their bytes


def verify_checkpoint(root: str | Path, vocab_size: Optional[int] = None,
                      tokenizer: Optional[str | Path] = None) -> list[FileCheck]:
    """Validate ``root``'s latest checkpoint (marker, args and layout of every rank, tensor names
    and shapes, each pickle's checksum), then verify every checksummed record of every file:
    optimizer state and padding rows included. CheckpointError at the first damage."""
    reader = open_checkpoint(root, vocab_size=vocab_size, tokenizer=tokenizer, verify=True)
    reader.validate_tensors()
    files = reader.stored_files()
    sizes = [f.path.stat().st_size for f in files]
    progress = Progress(f"verify {reader.directory}", total=sum(sizes))
    out = []
    for f, size in zip(files, sizes):
        records, nbytes = RecordChecks(f.path, f.container).check_all(f.blobs, progress.update)
        progress.update(size - nbytes)  # zip headers and unchecked bytes
        out.append(FileCheck(f.path, size, records, nbytes))
    return out
