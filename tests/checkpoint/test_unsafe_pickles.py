"""Loading never executes anything: a checkpoint whose pickles name a callable outside the explicit
allow-lists (``.metadata``: torch.distributed.checkpoint's metadata classes; shard files and
``common.pt``: tensors, argparse.Namespace, megatron-core's SAFE_GLOBALS) is refused with one line
naming the file and the global, by ``mlmega inspect`` and ``mlmega convert`` alike."""

from __future__ import annotations

import fractions
import importlib
import os
import pickle
from pathlib import Path

import pytest
import torch

from mlmega.checkpoint.dist_format import METADATA_FILE
from mlmega.checkpoint.integrity import manifest_path
from mlmega.config.errors import CheckpointError
from mlmega.checkpoint.directory import load_file
from mlmega.checkpoint.unpickle import DIST_METADATA_GLOBALS, load_dist_metadata
from mlmega.cli.main import main
from tests.checkpoint.conftest import copy_of

class _Call:
    """Pickles as a call of ``fn(arg)``: what a poisoned checkpoint would carry."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _payloads(marker: Path) -> dict[str, _Call]:
    return {"os.system": _Call(os.system, f"touch {marker}"),
            "eval": _Call(eval, f"open({str(marker)!r}, 'w').close()")}


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("payload", ["os.system", "eval"])
def test_poisoned_dist_metadata_is_refused_and_never_runs(small_checkpoints, tmp_path, payload, capsys):
    marker = tmp_path / "ran"
    ckpt = copy_of(small_checkpoints["torch_dist"], tmp_path / "ckpt")
    path = ckpt / "iter_0000003" / METADATA_FILE
    metadata = load_dist_metadata(path)
    metadata.planner_data = _payloads(marker)[payload]
    path.write_bytes(pickle.dumps(metadata))
    manifest_path(path).unlink()  # as a forger would: with it, the checksum refuses the file first
    global_name = {"os.system": "posix.system", "eval": "builtins.eval"}[payload]
    for argv in (["inspect", str(ckpt)],
                 ["convert", "reshard", "--src", str(ckpt), "--dst", str(tmp_path / "out")]):
        code, err = _run_cli(argv, capsys)
        assert code == 2
        assert err == (f"mlmega: error: {path}: refused to load global {global_name} (not a "
                       f"torch.distributed.checkpoint metadata type); the file is damaged or "
                       f"unsafe")
        assert not marker.exists(), "the pickle's call must never run"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt, relative", [
    ("torch", "iter_0000003/mp_rank_00_001/model_optim_rng.pt"),
    ("torch_dist", "iter_0000003/common.pt")])
def test_poisoned_torch_pickles_are_refused_and_never_run(small_checkpoints, tmp_path, fmt, relative,
                                                          capsys):
    marker = tmp_path / "ran"
    ckpt = copy_of(small_checkpoints[fmt], tmp_path / "ckpt")
    path = ckpt / relative
    content = torch.load(path, weights_only=False)
    content["args"].tokenizer_model = _payloads(marker)["os.system"]
    torch.save(content, path)
    manifest_path(path).unlink(missing_ok=True)  # (common.pt has none: torch.save's CRC32s)
    for argv in (["inspect", str(ckpt)],
                 ["convert", "reshard", "--src", str(ckpt), "--dst", str(tmp_path / "out")]):
        code, err = _run_cli(argv, capsys)
        assert code == 2
        assert err.startswith(f"mlmega: error: {path}: refused to load global posix.system ")
        assert "\n" not in err
        assert not marker.exists()


def test_torch_allow_list_is_explicit(tmp_path):
    """Args of the allowed types load; any other class (even a harmless one) is refused."""
    import argparse

    path = tmp_path / "f.pt"
    torch.save({"args": argparse.Namespace(hidden_size=8), "w": torch.ones(2)}, path)
    assert load_file(path)["args"].hidden_size == 8
    torch.save({"args": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError, match="refused to load global fractions.Fraction"):
        load_file(path)


def test_dist_metadata_allow_list_names_real_data_classes():
    for module, name in DIST_METADATA_GLOBALS:
        assert hasattr(importlib.import_module(module), name), (module, name)
    assert ("builtins", "getattr") not in DIST_METADATA_GLOBALS
    assert not any(module in ("os", "posix", "subprocess") or name in ("eval", "exec")
                   for module, name in DIST_METADATA_GLOBALS)


def test_concurrent_loads_keep_their_allow_list(tmp_path):
    """Threads loading shards at once (the savings protocol measures two runs' checkpoints side by
    side) each keep the allow-list their file needs: torch's is process-wide, and one load leaving
    its context must not take numpy's RNG state type away from another still reading."""
    import threading

    import numpy as np

    path = tmp_path / "rng.pt"
    torch.save({"rng_state": {"numpy": np.random.get_state()}, "w": torch.ones(2)}, path)
    errors, start = [], threading.Barrier(4)

    def load_many():
        start.wait()
        for _ in range(25):
            try:
                assert load_file(path)["rng_state"]["numpy"][1].shape == (624,)
            except Exception as err:  # noqa: BLE001 - collected for the assertion below
                errors.append(err)

    threads = [threading.Thread(target=load_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
