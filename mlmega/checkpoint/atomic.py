"""Atomic directory and file writes: a crash never leaves a half output that looks valid, and
``--overwrite`` replaces only a checkpoint, never its source, in one step.

A directory ``NAME`` is written as a hidden sibling ``.NAME.tmp-HOST-PID-XXXXXXXX`` and renamed into
place. Replacing an existing ``NAME`` swaps the two atomically (Linux ``renameat2`` with
``RENAME_EXCHANGE``); where that is not supported, ``NAME`` is first renamed to
``.NAME.old-HOST-PID``. The names say which process made them: :func:`recover`, run before every
write to ``NAME``, removes those of dead processes of this host, puts back a checkpoint whose
replacement stopped between its two renames, and reports those of other hosts.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from mlmega.config.errors import CheckpointError, ConfigError

# What a Megatron checkpoint directory holds (torch format and torch_dist): only such a directory
# may be replaced by --overwrite. Top level, then inside an iteration directory.
_CHECKPOINT_TOP = re.compile(r"latest_checkpointed_iteration\.txt|iter_\d{7}|release")
_CHECKPOINT_ITERATION = re.compile(
    r"mp_rank_\d{2}(_\d{3})?|(__\d+_\d+\.distcp|\.metadata)(\.mlmega-checksums\.json)?"
    r"|common\.pt|metadata\.json|\.mlmega-index-\d+\.json")


def _stderr(message: str) -> None:
    print(f"mlmega: {message}", file=sys.stderr)


def owner_tag() -> str:
    """HOST-PID of this process, as staging names carry it."""
    return f"{socket.gethostname()}-{os.getpid()}"


def staging_dir(dst: Path) -> Path:
    """A fresh hidden temporary directory next to ``dst`` (same filesystem, so rename is atomic),
    named after this process (see :func:`recover`)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{owner_tag()}-", dir=dst.parent))


def _leftover_owner(dst: Path, path: Path) -> tuple[str, str, int] | None:
    """(kind "tmp"/"old", host, pid) of a staging or replaced directory of ``dst``; None if
    ``path`` is not one (or is one from before names carried their owner)."""
    for kind, parts in (("tmp", 3), ("old", 2)):
        prefix = f".{dst.name}.{kind}-"
        if path.name.startswith(prefix):
            fields = path.name[len(prefix):].rsplit("-", parts - 1)
            if len(fields) == parts and fields[1].isdigit():
                return kind, fields[0], int(fields[1])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(dst: Path, report: Callable[[str], None] = _stderr) -> None:
    """Tidy what interrupted writes to ``dst`` left: put back a checkpoint whose replacement
    stopped between its renames, remove staging (and replaced) directories of dead processes of
    this host, and report those of other hosts (which may still be running)."""
    if not dst.parent.is_dir():
        return
    host = socket.gethostname()
    for path in sorted(dst.parent.glob(f".{dst.name}.*")):
        owner = _leftover_owner(dst, path)
        if owner is None or not path.is_dir():
            continue
        kind, owner_host, pid = owner
        if owner_host != host:
            report(f"{path}: left by process {pid} on {owner_host}, which may still be running; "
                   f"remove it when it is not")
        elif not _alive(pid):
            if kind == "old" and not dst.exists():
                os.replace(path, dst)
                report(f"{dst}: restored (process {pid} was replacing it and stopped after "
                       f"moving it to {path.name})")
            else:
                shutil.rmtree(path, ignore_errors=True)
                report(f"{path}: removed (left by process {pid}, which is no longer running)")


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _strangers(dst: Path) -> list[str]:
    """What in ``dst`` is not part of a Megatron checkpoint."""
    if not dst.is_dir() or dst.is_symlink():
        return [dst.name]
    out = []
    for child in sorted(dst.iterdir()):
        if not _CHECKPOINT_TOP.fullmatch(child.name):
            out.append(child.name + ("/" if child.is_dir() else ""))
        elif child.is_dir():
            out += [f"{child.name}/{entry.name}" for entry in sorted(child.iterdir())
                    if not _CHECKPOINT_ITERATION.fullmatch(entry.name)]
    return out


def check_destination(dst: Path, overwrite: bool, sources: Sequence[Path] = ()) -> None:
    """``dst`` may be written: it overlaps no source, and is new or (with ``overwrite``) a
    checkpoint; leftovers of interrupted writes to it are recovered first (:func:`recover`)."""
    for src in sources:
        if _overlap(dst, Path(src)):
            raise ConfigError(f"--dst {dst} overlaps the source {src} (one contains the other); "
                              f"choose a destination outside it")
    recover(dst)
    if not dst.exists() and not dst.is_symlink():
        return
    if not overwrite:
        raise ConfigError(f"{dst} already exists; pass --overwrite to replace it")
    strangers = _strangers(dst)
    if strangers:
        shown = ", ".join(strangers[:5]) + (", ..." if len(strangers) > 5 else "")
        raise ConfigError(f"{dst}: not a checkpoint that --overwrite may replace: it holds "
                          f"{shown}")


def _exchange(a: Path, b: Path) -> bool:
    """Swap paths ``a`` and ``b`` in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or filesystem does not support it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish(staging: Path, dst: Path, overwrite: bool, sources: Sequence[Path] = ()) -> None:
    """Move a finished staging directory to ``dst``, replacing it only with ``overwrite`` (and
    only a checkpoint): the old checkpoint stays in place until the new one is."""
    check_destination(dst, overwrite, sources)
    if not dst.exists():
        os.rename(staging, dst)
    elif _exchange(staging, dst):  # staging now holds the old checkpoint
        shutil.rmtree(staging, ignore_errors=True)
    else:  # a kill between the renames leaves .NAME.old-HOST-PID, which recover() puts back
        old = dst.with_name(f".{dst.name}.old-{owner_tag()}")
        os.rename(dst, old)
        os.rename(staging, dst)
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with writing(path):
        tmp.write_text(text)
        os.replace(tmp, path)
