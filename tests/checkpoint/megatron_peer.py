"""Megatron-LM at tag core_v0.16.1 (the peer in ``shared/peers``) as the judge of mlmega's
checkpoints: find it, run its checkpoint converter (``run_convert_on_cpu.py``) and its training's
checkpoint loading (``megatron_load.py``) in subprocesses.

Run as a script, this module is ``run_convert_on_cpu.py`` plus one import patch for BERT (it touches
no tensor): ``pretrain_bert.py`` imports ``bert_layer_with_transformer_engine_spec`` at module
level, which raises ImportError where TransformerEngine is not installed (this CPU machine) although
the checkpoints' ``args.spec == ['local']`` makes it build the local spec; the name is bound to None
first.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

PEER = "megatron-lm-core_v0.16.1"
ENV = "MLMEGA_MEGATRON_LM"  # the peer's folder, where it is not in shared/peers above the repo
TIMEOUT_S = 600  # the converter waits forever when its loader finds nothing to load
_REQUIRED = ("six", "regex", "pydantic")  # what Megatron-LM's training package imports


def peer_root() -> Optional[Path]:
    """The peer's folder: $MLMEGA_MEGATRON_LM, else shared/peers/<PEER> in the repo or above it."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    repo = Path(__file__).resolve().parents[2]
    for base in (repo, *repo.parents):
        candidate = base / "shared" / "peers" / PEER
        if (candidate / "run_convert_on_cpu.py").is_file():
            return candidate
    return None


def require_peer() -> Path:
    """The peer's folder, or skip the test saying what is missing."""
    root = peer_root()
    if root is None or not (root / "run_convert_on_cpu.py").is_file():
        pytest.skip(f"Megatron-LM {PEER} not found (set ${ENV} or put it in shared/peers/ above "
                    f"the repository)")
    missing = [m for m in _REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"Megatron-LM's training package needs {missing}: pip install -e '.[test]'")
    return root


def megatron_convert(src: Path, dst: Path, model_type: str, tp: int, pp: int,
                     true_vocab_size: Optional[int] = None) -> Path:
    """Convert ``src`` into ``dst`` (TP ``tp``, PP ``pp``, torch format) with Megatron-LM's own
    converter (loader core, saver core, local transformer implementation); returns ``dst``."""
    root = require_peer()
    command = [sys.executable, "-W", "ignore", __file__, str(root / "run_convert_on_cpu.py"),
               "--model-type", model_type, "--loader", "core", "--saver", "core",
               "--load-dir", str(src), "--save-dir", str(dst),
               "--target-tensor-parallel-size", str(tp),
               "--target-pipeline-parallel-size", str(pp),
               "--loader-transformer-impl", "local", "--saver-transformer-impl", "local"]
    if true_vocab_size is not None:
        command += ["--true-vocab-size", str(true_vocab_size)]
    # it exits 0 even when its saver process crashes: the marker says whether it saved
    _run(command, dst.parent, dst / "latest_checkpointed_iteration.txt",
         "Megatron-LM's converter")
    return dst


def _run(command: list[str], cwd: Path, output: Path, what: str) -> None:
    """Run ``command`` (with the peer's megatron only: no PYTHONPATH) under :data:`TIMEOUT_S`;
    fail with its output's tail unless it exits 0 and ``output`` exists."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{what} did not finish in {TIMEOUT_S} s: "
                             f"{str(err.stdout or '')[-3000:]}") from None
    if done.returncode != 0 or not output.is_file():
        raise AssertionError(f"{what} failed (exit {done.returncode}):\n"
                             f"{(done.stdout + done.stderr)[-4000:]}")


def megatron_load(ckpt: Path, out: Path, model_type: str, save: Optional[Path] = None) -> dict:
    """What Megatron-LM's training builds and loads from ``ckpt`` (TP=1, PP=1): its model's
    state dict and logits (``megatron_load.py``, in a subprocess); with ``save``, it also saves
    that model there as torch_dist."""
    root = require_peer()
    script = Path(__file__).with_name("megatron_load.py")
    command = [sys.executable, "-W", "ignore", str(script), str(root), str(ckpt), str(out),
               model_type, *([str(save)] if save else [])]
    _run(command, out.parent, out, f"Megatron-LM loading {ckpt}")
    return torch.load(out, weights_only=True)


if __name__ == "__main__":  # python megatron_peer.py .../run_convert_on_cpu.py ARGS...
    script = sys.argv[1]
    sys.path.insert(0, os.path.dirname(script))  # the peer's megatron ahead of the installed one
    import megatron.core.models.bert.bert_layer_specs as bert_specs  # noqa: E402

    bert_specs.bert_layer_with_transformer_engine_spec = None
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")
