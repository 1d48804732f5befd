"""Streaming torch-format writer: files torch.load reads unchanged, tensors written one at a time."""

from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import subprocess
import sys
import weakref
import zipfile

import pytest
import torch

from mlmega.checkpoint.integrity import manifest_path, new_hash
from mlmega.checkpoint.layout import ShardLayout
from mlmega.checkpoint.streaming import LazyTensor, RowBlocks, StreamingWriter, save_streaming
from mlmega.checkpoint.directory import load_file
from mlmega.checkpoint.torch_format import TorchCheckpoint, write_rank_file
from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig
from mlmega.models.params import iter_params, param_shapes
from tests.helpers import file_records


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _content() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "args": argparse.Namespace(num_layers=2, hidden_size=8, lr=1e-3, name="x", tp=None),
        "checkpoint_version": 3.0,
        "iteration": 7,
        "model": {
            "w": torch.randn(6, 4, generator=gen),
            "b": torch.randn(4, generator=gen).to(torch.bfloat16),
            "ids": torch.arange(5),
            "u16": torch.arange(5).to(torch.uint16),  # a storage-less (v3) dtype
            "mask": torch.tensor([True, False]),
            "half": torch.randn(3, generator=gen).half(),
            "empty": torch.empty(0, 3),
            "scalar": torch.tensor(2.5),
            "layer._extra_state": None,
        },
        "rng": [torch.randn(2, generator=gen), 1, "two", (3.0, None)],
        "opt": {"step": 3, "state": {0: {"exp_avg": torch.zeros(4)}}},
    }


def _load(path, mmap):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True, mmap=mmap)


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) if a.dtype != torch.uint16 else torch.equal(a.int(), b.int())
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert type(a) is type(b) and a == b


@pytest.mark.parametrize("checksums", [None, False])  # through torch's writer / straight
@pytest.mark.parametrize("mmap", [False, True])
def test_file_loads_with_torch_load_and_matches(tmp_path, mmap, checksums):
    content = _content()
    path = tmp_path / "model_optim_rng.pt"
    nbytes = save_streaming(content, path, checksums=checksums)
    assert nbytes == sum(t.numel() * t.element_size() for t in _tensors(content))
    _assert_same(content, _load(path, mmap))


def test_pickle_and_records_match_torch_save(tmp_path):
    """Same data.pkl bytes, same record set, same storage bytes as torch.save (order aside; the
    archive's top directory is "archive", as torch.save to a file object names it)."""
    content = _content()
    torch.save(content, tmp_path / "a.pt")
    save_streaming(content, tmp_path / "b.pt")
    with zipfile.ZipFile(tmp_path / "a.pt") as a, zipfile.ZipFile(tmp_path / "b.pt") as b:
        names_a = {n.split("/", 1)[1] for n in a.namelist()}
        names_b = {n.split("/", 1)[1] for n in b.namelist()}
        assert names_a == names_b and {n.split("/")[0] for n in b.namelist()} == {"archive"}
        for name in sorted(names_a - {".data/serialization_id"}):
            assert a.read(f"a/{name}") == b.read(f"archive/{name}"), name
        assert b.testzip() is None  # CRC32s are right (as torch.save writes them)


def test_lazy_tensors_are_produced_in_order_and_freed_after_writing(tmp_path):
    produced, alive = [], []

    def make(i):
        def produce():
            # every earlier tensor is gone by the time the next one is made
            assert all(ref() is None for ref in alive), f"tensor {len(alive) - 1} still alive"
            t = torch.full((1000,), float(i))
            produced.append(i)
            alive.append(weakref.ref(t))
            return t
        return produce

    released = []
    model = {f"t{i}": LazyTensor(make(i), release=lambda i=i: released.append(i)) for i in range(5)}
    model["x._extra_state"] = None
    save_streaming({"model": model, "iteration": 1}, tmp_path / "f.pt")
    gc.collect()
    assert produced == released == list(range(5))
    assert all(ref() is None for ref in alive)
    loaded = _load(tmp_path / "f.pt", mmap=True)
    assert list(loaded["model"]) == [f"t{i}" for i in range(5)] + ["x._extra_state"]
    for i in range(5):
        assert torch.equal(loaded["model"][f"t{i}"], torch.full((1000,), float(i)))


def test_views_are_written_compactly_and_shared_objects_once(tmp_path):
    base = torch.randn(1000, 100)
    view = base[10:12, ::2]  # non-contiguous view into a large storage
    rows = base[500:503]  # contiguous view at an offset: written from its own memory
    shared = torch.randn(3)
    save_streaming({"v": view, "r": rows, "a": shared, "b": shared}, tmp_path / "f.pt")
    assert (tmp_path / "f.pt").stat().st_size < base.numel() * 4 // 10
    loaded = _load(tmp_path / "f.pt", mmap=False)
    assert torch.equal(loaded["v"], view) and loaded["v"].is_contiguous()
    assert torch.equal(loaded["r"], rows) and loaded["r"].storage_offset() == 0
    assert loaded["a"] is loaded["b"]  # as torch.save: one object, one record


def test_tensors_inside_other_objects_and_parameters_still_saved(tmp_path):
    param = torch.nn.Parameter(torch.randn(2, 2))
    args = argparse.Namespace(table=torch.arange(3))
    save_streaming({"p": param, "args": args, "t": torch.ones(2)}, tmp_path / "f.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = torch.load(tmp_path / "f.pt", weights_only=True)
    assert isinstance(loaded["p"], torch.nn.Parameter) and torch.equal(loaded["p"], param)
    assert torch.equal(loaded["args"].table, args.table)
    assert torch.equal(loaded["t"], torch.ones(2))


def test_a_failing_producer_leaves_no_file(tmp_path):
    def boom():
        raise RuntimeError("producer failed")

    path = tmp_path / "f.pt"
    with pytest.raises(RuntimeError, match="producer failed"):
        save_streaming({"a": torch.ones(3), "b": LazyTensor(boom)}, path)
    assert not path.exists()
    with pytest.raises(ValueError):
        with StreamingWriter(path) as writer:
            writer.write_tensor(torch.ones(3))
            raise ValueError("caller failed")
    assert not path.exists()


@pytest.mark.parametrize("checksums", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_blocks_are_written_as_the_tensor_they_make_up(tmp_path, checksums, dtype):
    """Same file as writing the whole tensor (record bytes, pickle), blocks made one at a time."""
    whole = torch.randn(10, 6, generator=torch.Generator().manual_seed(1)).to(dtype)
    made = []

    def blocks():
        for start in range(0, 10, 4):
            made.append(start)
            yield whole[start:start + 4].clone()

    save_streaming({"w": whole}, tmp_path / "whole.pt", checksums=checksums)
    with StreamingWriter(tmp_path / "rows.pt", checksums=checksums) as writer:
        writer.finish({"w": writer.write_tensor(RowBlocks((10, 6), dtype, blocks))})
    assert made == [0, 4, 8]
    a, b = (torch._C.PyTorchFileReader(str(tmp_path / f)) for f in ("whole.pt", "rows.pt"))
    for name in ("data/0", "data.pkl"):  # (this reader does not check CRC32s)
        assert a.get_record(name) == b.get_record(name), name
    if checksums:
        with zipfile.ZipFile(tmp_path / "rows.pt") as z:
            assert z.testzip() is None
    loaded = _load(tmp_path / "rows.pt", mmap=True)["w"]
    assert loaded.dtype == dtype and torch.equal(loaded, whole)
    assert torch.equal(RowBlocks((10, 6), dtype, blocks).materialize(), whole)


@pytest.mark.parametrize("checksums", [True, False])
def test_failing_or_short_row_blocks_raise_and_leave_no_file(tmp_path, checksums):
    def failing():
        yield torch.zeros(2, 3)
        raise ConfigError("block failed")

    def short():
        yield torch.zeros(2, 3)

    path = tmp_path / "f.pt"
    short_error = "gave 2 rows, expected 4|hold 24 bytes, its header says 48"
    for blocks, error in ((failing, "block failed"), (short, short_error)):
        with pytest.raises((ConfigError, RuntimeError), match=error):
            with StreamingWriter(path, checksums=checksums) as writer:
                writer.write_tensor(torch.ones(3))
                writer.write_tensor(RowBlocks((4, 3), torch.float32, blocks))
        assert not path.exists()


_FILE_SIZE_LIMITED = """
import resource, signal, sys, torch
from mlmega.config.errors import CheckpointError
from mlmega.checkpoint.streaming import save_streaming
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: write() fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    save_streaming({"a": torch.ones(1 << 19)}, sys.argv[1], checksums=sys.argv[2] == "1")
except CheckpointError as exc:
    print("raised", exc)
"""


@pytest.mark.parametrize("checksums", [True, False])
def test_a_failing_write_raises_and_leaves_no_file(tmp_path, checksums):
    """A write error (here: over the process's file size limit, as a full disk would) comes out as
    one line naming the file, not as an abort inside torch's C++ writer."""
    path = tmp_path / "f.pt"
    run = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMITED, str(path), str(int(checksums))],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == f"raised {path}: cannot write ({os.strerror(errno.EFBIG)})"
    assert not path.exists()


CFG = ModelConfig(arch="gpt", num_layers=4, hidden_size=32, num_attention_heads=4,
                  vocab_size=100, max_sequence_length=16)


def test_rank_file_with_lazy_model_loads_like_an_eager_one(tmp_path):
    layout = ShardLayout(CFG, 2, 2)
    gen = torch.Generator().manual_seed(3)
    for tp_rank, pp_rank in layout.ranks:
        eager = {p.local_name: torch.randn(layout.local_shape(p.spec), generator=gen)
                 for p in layout.pp_stage_params(pp_rank)}
        lazy = {k: LazyTensor(lambda v=v: v.clone()) for k, v in eager.items()}
        a = write_rank_file(tmp_path / "eager", layout, tp_rank, pp_rank, eager, 3)
        b = write_rank_file(tmp_path / "lazy", layout, tp_rank, pp_rank, lazy, 3)
        _assert_same(load_file(a), load_file(b))
        loaded = load_file(b)
        assert loaded["args"].tensor_model_parallel_size == 2 and loaded["iteration"] == 3
        assert "decoder.layers.0.self_attention.linear_qkv._extra_state" in loaded["model"]
        assert loaded["model"]["decoder.layers.0.self_attention.linear_qkv._extra_state"] is None


@pytest.mark.parametrize("target", [(1, 1), (2, 1), (1, 4)])
def test_streamed_reshard_is_exact(tmp_path, target):
    from mlmega.checkpoint.convert import run_conversion
    from mlmega.checkpoint.convert_plan import plan_conversion
    from mlmega.checkpoint.formats import load_full_state, save_full_state

    gen = torch.Generator().manual_seed(1)
    state = {name: torch.randn(shape, generator=gen) for name, shape in param_shapes(CFG).items()}
    save_full_state(state, ShardLayout(CFG, 2, 2), tmp_path / "src", iteration=9)
    run_conversion(plan_conversion("reshard", tmp_path / "src", tmp_path / "dst",
                                   target_tp=target[0], target_pp=target[1]), log=lambda *a: None)
    ckpt = TorchCheckpoint.open(tmp_path / "dst")
    assert (ckpt.layout.tp, ckpt.layout.pp, ckpt.iteration) == (*target, 9)
    back, _ = load_full_state(tmp_path / "dst")
    assert set(back) == {name for name, _, _ in iter_params(CFG)}
    assert all(torch.equal(back[k], state[k]) for k in state)
    # the plain loader (mmap or not) reads every rank file
    for tp_rank, pp_rank in ckpt.layout.ranks:
        _load(ckpt.shard_path(tp_rank, pp_rank), mmap=False)


@pytest.mark.parametrize("op,target", [("coalesce", (2, 2)), ("decoalesce", (2, 2)),
                                       ("interpolate", (2, 2)), ("interpolate", (2, 1))])
def test_streamed_level_conversions_match_the_operators(tmp_path, op, target):
    """Sharded, streamed conversion (TP=2 target: interpolation runs on the shards; at the large
    level's layout its shards are read as stored, at another one split from its gather) gives
    exactly what the full-state operators give."""
    from mlmega.checkpoint.convert import run_conversion
    from mlmega.checkpoint.convert_plan import plan_conversion
    from mlmega.checkpoint.formats import load_full_state, save_full_state
    from mlmega.operators import LevelSchemes, coalesce, decoalesce, interpolate

    large_cfg = CFG.replace(num_query_groups=4)
    schemes = LevelSchemes.from_factors(width_factor=2, depth_factor=2)
    gen = torch.Generator().manual_seed(5)

    def random_state(cfg):
        return {n: torch.randn(s, generator=gen) for n, s in param_shapes(cfg).items()}

    large = random_state(large_cfg)
    save_full_state(large, ShardLayout(large_cfg, 2, 2), tmp_path / "large")
    if op == "coalesce":
        expected, _ = coalesce(large, large_cfg, schemes)
        plan = plan_conversion(op, tmp_path / "large", tmp_path / "out", schemes=schemes)
    else:
        small, small_cfg = coalesce(random_state(large_cfg), large_cfg, schemes)
        save_full_state(small, ShardLayout(small_cfg, 2, 1), tmp_path / "small")
        expected, _ = decoalesce(small, small_cfg, schemes)
        if op == "interpolate":
            expected = interpolate(large, expected, large_cfg, 0.3)
        plan = plan_conversion(op, tmp_path / "small", tmp_path / "out", schemes=schemes,
                               target_tp=target[0], target_pp=target[1], alpha=0.3,
                               large=tmp_path / "large" if op == "interpolate" else None)
    run_conversion(plan, log=lambda *a: None)
    got, layout = load_full_state(tmp_path / "out")
    assert (layout.tp, layout.pp) == target and set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)



def test_manifest_covers_every_record_the_pickle_included(tmp_path):
    """Tensor records, the pickle and storages pickled late (a Parameter's): each hashed as read."""
    path = tmp_path / "f.pt"
    save_streaming({"p": torch.nn.Parameter(torch.randn(3, 2)), "t": torch.ones(4),
                    "args": argparse.Namespace(lr=0.1)}, path)
    records = file_records(path)
    hashed = {name for name in records if name == "data.pkl" or name.startswith("data/")}
    assert len(hashed) == 3
    manifest = json.loads(manifest_path(path).read_text())["records"]
    data = path.read_bytes()
    assert sorted(manifest) == sorted(
        [records[n].offset, records[n].length,
         new_hash(data[records[n].offset:records[n].offset + records[n].length]).hexdigest()]
        for n in hashed)
