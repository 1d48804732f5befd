"""Atomic directory and file writes: a crash never leaves a half output that looks valid."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mlmega.checkpoint.errors import CheckpointError
from mlmega.config.errors import ConfigError


def staging_dir(dst: Path) -> Path:
    """A fresh hidden temporary directory next to ``dst`` (same filesystem, so rename is atomic)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))


def check_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise ConfigError(f"{dst} already exists; pass --overwrite to replace it")


def publish(staging: Path, dst: Path, overwrite: bool) -> None:
    """Move a finished staging directory to ``dst`` (replacing it only with ``overwrite``)."""
    check_destination(dst, overwrite)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(staging, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory; on success it becomes ``dst``, on error it is removed."""
    dst = Path(dst)
    check_destination(dst, overwrite)
    staging = staging_dir(dst)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, dst, overwrite)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Report an OSError met while writing ``path`` (a full disk, a quota) as one line."""
    try:
        yield
    except OSError as err:
        raise CheckpointError(f"{path}: cannot write ({err.strerror or err})") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file via a temp file and ``os.replace`` (readers see old or new, never half)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        tmp.write_text(text)
        os.replace(tmp, path)
