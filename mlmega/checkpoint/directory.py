"""What both Megatron checkpoint formats share: the ``latest`` marker, iteration directories, safe
loading of pickled files, and the pipeline split that ``args`` record.

    ROOT/latest_checkpointed_iteration.txt        "1000" (or "release" -> ROOT/release/)
    ROOT/iter_0001000/...                         (the format's files)
"""

from __future__ import annotations

import argparse
import pickle
import re
import threading
from pathlib import Path
from typing import Any, Optional

import torch

from mlmega.checkpoint.integrity import RecordChecks
from mlmega.config.errors import CheckpointError
from mlmega.config.model import ModelConfig

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
_REFUSED_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)
# torch's allow-list is process-wide: a load leaving its ``safe_globals`` context removes them
# for every thread, so loads in threads take turns
_ALLOW_LIST_LOCK = threading.Lock()


def safe_globals() -> list:
    """Classes Megatron checkpoints pickle besides tensors (megatron-core's own allow-list)."""
    from megatron.core.safe_globals import SAFE_GLOBALS

    return list(SAFE_GLOBALS)


def _stdlib_safe_globals() -> list:
    """The standard-library part of megatron-core's allow-list (all that args of mlmega's own and
    most Megatron-LM checkpoints need): loading with it avoids importing megatron-core (seconds)."""
    import io
    import pathlib
    import signal
    import types

    return [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, io.BytesIO,
            signal.Signals]


def load_file(path: Path, mmap: bool = True,
              checks: Optional[RecordChecks] = None) -> dict[str, Any]:
    """``torch.load`` one shard file safely: tensors plus the explicit allow-list of classes
    (:func:`_stdlib_safe_globals`, else megatron-core's :func:`safe_globals`); anything else, and
    corrupt or truncated files, raise CheckpointError. ``checks`` (the file's): check the
    pickle's checksum first (its tensors' records are checked where they are read)."""
    if checks is not None:
        checks.check_record("data.pkl")
    try:
        with _ALLOW_LIST_LOCK:
            try:
                with torch.serialization.safe_globals(_stdlib_safe_globals()):
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except pickle.UnpicklingError as err:
                if "Unsupported global" not in str(err):
                    raise
            with torch.serialization.safe_globals(safe_globals()):  # megatron enums, numpy, ...
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError for bad files
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused:
            raise CheckpointError(f"{path}: refused to load global {refused[1]} (not a tensor "
                                  f"or an allowed checkpoint type); the file is damaged or "
                                  f"unsafe") from None
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: cannot load checkpoint shard ({type(err).__name__}: "
                              f"{first_line})") from None


def iteration_dir_name(iteration: int, release: bool = False) -> str:
    return "release" if release else f"iter_{iteration:07d}"


def read_tracker(root: Path) -> tuple[int, bool]:
    """(iteration, release) from ROOT/latest_checkpointed_iteration.txt."""
    tracker = root / TRACKER
    try:
        text = tracker.read_text().strip()
    except FileNotFoundError:
        raise CheckpointError(f"{root}: not a Megatron torch checkpoint (no {TRACKER})") from None
    if text == "release":
        return 0, True
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', got {text!r}")
    return int(text), False


def latest_directory(root: Path) -> tuple[int, bool, Path]:
    """(iteration, release, directory) that ROOT's ``latest`` marker names; it must exist."""
    iteration, release = read_tracker(root)
    directory = root / iteration_dir_name(iteration, release)
    if not directory.is_dir():
        raise CheckpointError(f"{root / TRACKER} names iteration {iteration} but {directory} "
                              f"does not exist")
    return iteration, release, directory


def layers_per_pp_stage(args: argparse.Namespace, cfg: ModelConfig, pp: int) -> Optional[tuple]:
    """Layers per pipeline stage from args' uneven first/last stage sizes; None: even split."""
    first = getattr(args, "decoder_first_pipeline_num_layers", None)
    last = getattr(args, "decoder_last_pipeline_num_layers", None)
    if pp == 1 or (first is None and last is None):
        return None
    middle_stages = pp - (first is not None) - (last is not None)
    rest = cfg.num_layers - (first or 0) - (last or 0)
    if bool(rest) != bool(middle_stages) or (middle_stages and rest % middle_stages):
        raise CheckpointError(f"args: decoder_first/last_pipeline_num_layers={first}/{last} do not "
                              f"split {cfg.num_layers} layers over PP={pp}")
    middle = rest // middle_stages if middle_stages else 0
    return tuple(([first] if first is not None else []) + [middle] * middle_stages
                 + ([last] if last is not None else []))
