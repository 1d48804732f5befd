"""RecordFile: tensors loaded with mmap are read by pread, with their values, without the map."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch

from mlmega.checkpoint.records import RecordFile
from mlmega.checkpoint.directory import load_file
from mlmega.config.errors import CheckpointError

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def _saved(tmp_path):
    gen = torch.Generator().manual_seed(0)
    model = {"w": torch.randn(64, 48, generator=gen),
             "b": torch.randn(48, generator=gen).to(torch.bfloat16),
             "ids": torch.arange(10),
             "big": torch.randn(4 << 20, generator=gen)}  # 16 MiB
    path = tmp_path / "f.pt"
    torch.save({"model": model}, path)
    return path, model


def _rss_file_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


@linux
def test_offsets_are_the_zip_records_offsets(tmp_path):
    path, model = _saved(tmp_path)
    loaded = load_file(path)["model"]
    records = RecordFile(path)
    reader = torch._C.PyTorchFileReader(str(path))
    offsets = {reader.get_record_offset(name) for name in reader.get_all_records()
               if re.search(r"(^|/)data/\d+$", name)}
    assert {records.offset(t) for t in loaded.values()} == offsets


@linux
def test_read_into_gives_the_values_without_touching_the_map(tmp_path):
    path, model = _saved(tmp_path)
    loaded = load_file(path)["model"]
    records = RecordFile(path)
    before = _rss_file_kb()
    out = torch.empty_like(model["big"])
    records.read_into(out, loaded["big"])
    assert torch.equal(out, model["big"])
    assert _rss_file_kb() - before < 4 * 1024  # the 16 MiB were not mapped in
    for name in ("w", "b", "ids"):
        out = torch.zeros_like(model[name])
        records.read_into(out, loaded[name])
        assert out.dtype == model[name].dtype and torch.equal(out, model[name])
    # a strided destination (a TP shard's place in a gathered tensor) gets the same values
    full = torch.zeros(64, 96)
    records.read_into(full[:, 48:], loaded["w"])
    assert torch.equal(full[:, 48:], model["w"]) and not full[:, :48].any()


@linux
def test_a_file_truncated_after_loading_gives_a_clear_error(tmp_path):
    path, _ = _saved(tmp_path)
    loaded = load_file(path)["model"]
    records = RecordFile(path)
    offset = records.offset(loaded["big"])
    os.truncate(path, offset + 1024)
    with pytest.raises(CheckpointError, match="truncated"):
        records.read_into(torch.empty(4 << 20), loaded["big"])


def test_tensors_not_in_a_mapping_are_copied(tmp_path):
    path, model = _saved(tmp_path)
    records = RecordFile(path)
    assert records.offset(model["w"]) is None  # anonymous memory, not the file's
    out = torch.empty_like(model["w"])
    records.read_into(out, model["w"])
    assert torch.equal(out, model["w"])


def test_checkpoint_reads_equal_the_layouts_split_and_gather(tmp_path):
    """read() gathers every parameter of a TP=2, PP=2 GQA/SwiGLU checkpoint back to the saved
    tensor; read_shard() gives exactly split(), with stored padding rows past the TP=1 padded
    vocabulary zeroed (split pads zeros there)."""
    from mlmega.checkpoint.formats import save_full_state
    from mlmega.checkpoint.layout import ShardLayout
    from mlmega.checkpoint.torch_format import TorchCheckpoint, write_rank_file
    from mlmega.config.model import ModelConfig
    from mlmega.models.params import iter_params, param_shapes

    cfg = ModelConfig(arch="gpt", num_layers=4, hidden_size=64, num_attention_heads=8,
                      num_query_groups=4, activation="swiglu", tie_embeddings=False,
                      vocab_size=100, max_sequence_length=16)
    gen = torch.Generator().manual_seed(11)
    state = {name: torch.randn(shape, generator=gen) for name, shape in param_shapes(cfg).items()}
    layout = ShardLayout(cfg, 2, 2)
    assert cfg.padded_vocab_size(2) > cfg.padded_vocab_size(1)  # rank 1 stores padding rows
    save_full_state(state, layout, tmp_path / "ck")
    # padding rows as a trained Megatron model may hold them (not zero)
    ckpt = TorchCheckpoint.open(tmp_path / "ck")
    model = {k: v.clone() for k, v in ckpt.model_state(1, 1).items() if v is not None}
    model["output_layer.weight"][-8:] = 1.0
    write_rank_file(tmp_path / "ck", layout, 1, 1, model, ckpt.iteration)

    ckpt = TorchCheckpoint.open(tmp_path / "ck")
    for name, spec, _ in iter_params(cfg):
        full = ckpt.read(name)
        assert torch.equal(full, state[name]), name
        for r in range(2):
            assert torch.equal(ckpt.read_shard(name, r), layout.split(spec, full, r)), (name, r)


def test_read_rows_spans_the_vocab_shards(tmp_path):
    """read_rows() gives rows of the full tensor for vocab-split and replicated parameters, also
    rows that span both TP ranks' shards (vocab 200: 128 canonical rows per rank at TP=2)."""
    from mlmega.checkpoint.formats import save_full_state
    from mlmega.checkpoint.layout import ShardLayout
    from mlmega.checkpoint.torch_format import TorchCheckpoint
    from mlmega.config.model import ModelConfig
    from mlmega.models.params import iter_params, param_shapes

    cfg = ModelConfig(arch="gpt", num_layers=2, hidden_size=64, num_attention_heads=4,
                      tie_embeddings=False, vocab_size=200, max_sequence_length=16)
    gen = torch.Generator().manual_seed(12)
    state = {name: torch.randn(shape, generator=gen) for name, shape in param_shapes(cfg).items()}
    save_full_state(state, ShardLayout(cfg, 2, 2), tmp_path / "ck")
    ckpt = TorchCheckpoint.open(tmp_path / "ck")
    checked = 0
    for name, spec, _ in iter_params(cfg):
        if spec.tp_dim is not None and spec.dims[spec.tp_dim] != "vocab":
            continue
        rows = state[name].shape[0]
        for start, count in ((0, rows), (0, 0), (rows // 2 - 3, 7), (rows - 5, 5), (1, 1)):
            assert torch.equal(ckpt.read_rows(name, start, count),
                               state[name].narrow(0, start, count)), (name, start, count)
        checked += spec.tp_dim is not None
    assert checked == 2  # word embeddings and output layer
