"""Damage is detected, not copied: flipped bytes in a tensor record, NaN/Inf values (on request),
and ranks whose args or iteration disagree are one-line errors (exit code 2) before anything is
published."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mlmega.checkpoint.formats import load_full_state
from mlmega.checkpoint.integrity import MANIFEST_SUFFIX
from mlmega.checkpoint.directory import TRACKER
from mlmega.cli.main import main
from tests.checkpoint.conftest import SMALL_GPT, copy_of
from tests.helpers import file_records, flip_byte, make_model_state

SHARD = "iter_0000003/mp_rank_01_000/model_optim_rng.pt"


def _convert(src: Path, dst: Path, capsys, *options: str) -> tuple[int, str]:
    code = main(["convert", "reshard", "--src", str(src), "--dst", str(dst), "--target-tp", "1",
                 *options])
    return code, capsys.readouterr().err.strip()


def _largest_record(path: Path):
    """The file's largest tensor record but the word embeddings' (data/0, whose rows on this TP
    rank are vocab padding, never read): a TP-split weight, read by every conversion."""
    return max((r for name, r in file_records(path).items()
                if name.startswith("data/") and name != "data/0"), key=lambda r: r.length)


def _shard_written_by(small_checkpoints, tmp_path: Path, written_by: str) -> tuple[Path, Path, str]:
    """A copy of the torch checkpoint, its rank file SHARD as mlmega wrote it or rewritten by
    torch.save (without a manifest), and the checksum that guards it."""
    ckpt = copy_of(small_checkpoints["torch"], tmp_path / "ckpt")
    path = ckpt / SHARD
    if written_by == "torch.save":
        torch.save(torch.load(path, weights_only=False), path)
        Path(str(path) + MANIFEST_SUFFIX).unlink()
        return ckpt, path, "crc32"
    return ckpt, path, "xxh3_64"


@pytest.mark.parametrize("written_by", ["mlmega", "torch.save"])
def test_flipped_bytes_in_a_torch_record_are_detected(small_checkpoints, tmp_path, capsys, written_by):
    """mlmega's files: their xxh3 manifest; torch.save's (Megatron-LM's): the zip's CRC32s."""
    ckpt, path, algorithm = _shard_written_by(small_checkpoints, tmp_path, written_by)
    record = _largest_record(path)
    flip_byte(path, record.offset + record.length // 2)
    dst = tmp_path / "out"
    code, err = _convert(ckpt, dst, capsys)
    assert code == 2
    assert err == (f"mlmega: error: {path}: the {record.length}-byte record at byte "
                   f"{record.offset} fails its {algorithm} check " + err.split(" check ", 1)[1])
    rewritten = f" (or was rewritten without its {path.name}{MANIFEST_SUFFIX})" \
        if written_by == "mlmega" else ""
    assert f"the file is damaged{rewritten}; nothing was published to" in err and "\n" not in err
    assert not dst.exists() and not list(tmp_path.glob(".out.*")), "nothing published or left"
    # --no-verify converts it as it is: the flipped value is copied
    assert _convert(ckpt, dst, capsys, "--no-verify")[0] == 0
    assert dst.exists()


def test_flipped_bytes_in_a_dist_chunk_are_detected(small_checkpoints, tmp_path, capsys):
    ckpt = copy_of(small_checkpoints["torch_dist"], tmp_path / "ckpt")
    # rank 0's largest chunk: word-embedding rows 0-127, which the conversion reads (rank 1's holds
    # rows 128-255, vocabulary padding past the target's, which it never reads)
    path = ckpt / "iter_0000003" / "__0_0.distcp"
    records = json.loads(Path(str(path) + MANIFEST_SUFFIX).read_text())["records"]
    offset, length, _ = max(records, key=lambda r: r[1])
    flip_byte(path, offset + length // 2)
    code, err = _convert(ckpt, tmp_path / "out", capsys)
    assert code == 2 and "\n" not in err
    assert f"{path}: the {length}-byte record at byte {offset} fails its xxh3_64 check" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_check_finite_refuses_nan_and_inf_on_request(small_checkpoints, tmp_path, capsys):
    ckpt = copy_of(small_checkpoints["torch"], tmp_path / "ckpt")
    path = ckpt / SHARD
    content = torch.load(path, weights_only=False)
    content["model"]["decoder.layers.0.mlp.linear_fc1.weight"][3, 5] = float("nan")
    torch.save(content, path)
    Path(str(path) + MANIFEST_SUFFIX).unlink()
    code, err = _convert(ckpt, tmp_path / "out", capsys, "--check-finite")
    assert code == 2
    assert f"{path}: decoder.layers.0.mlp.linear_fc1.weight: 1 of " in err
    assert "values are NaN or Inf" in err and not (tmp_path / "out").exists()
    assert _convert(ckpt, tmp_path / "out", capsys)[0] == 0  # not checked by default


def _edit_shard(ckpt: Path, relative: str, **changes) -> Path:
    path = ckpt / relative
    content = torch.load(path, weights_only=False)
    for key, value in changes.items():
        if key == "iteration":
            content["iteration"] = value
        else:
            setattr(content["args"], key, value)
    torch.save(content, path)
    Path(str(path) + MANIFEST_SUFFIX).unlink()
    return path


@pytest.mark.parametrize("change, message", [
    (dict(tensor_model_parallel_size=4), "args.tensor_model_parallel_size=4, expected 2"),
    (dict(num_attention_heads=8), "args.num_attention_heads=8, expected 4"),
    (dict(iteration=9), "iteration=9, expected 3 (named by {tracker})"),
])
def test_ranks_that_disagree_are_refused_before_writing(small_checkpoints, tmp_path, capsys, change,
                                                        message):
    ckpt = copy_of(small_checkpoints["torch"], tmp_path / "ckpt")
    path = _edit_shard(ckpt, SHARD, **change)
    code, err = _convert(ckpt, tmp_path / "out", capsys)
    assert code == 2 and "\n" not in err
    expected = message.format(tracker=ckpt / TRACKER)
    assert err.startswith(f"mlmega: error: {path}: {expected}"), err
    if "args." in expected:
        assert err.endswith(f"(as in {ckpt / 'iter_0000003/mp_rank_00_000/model_optim_rng.pt'})")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_intact_checkpoints_verify_and_read_back(small_checkpoints):
    state = make_model_state(SMALL_GPT, seed=0)
    for fmt in ("torch", "torch_dist"):
        back, _ = load_full_state(small_checkpoints[fmt])
        assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("written_by", ["mlmega", "torch.save"])
def test_a_flipped_byte_in_the_pickle_is_detected_before_unpickling(small_checkpoints, tmp_path,
                                                                    capsys, written_by):
    ckpt, path, algorithm = _shard_written_by(small_checkpoints, tmp_path, written_by)
    record = file_records(path)["data.pkl"]
    flip_byte(path, record.offset + record.length // 2)
    code, err = _convert(ckpt, tmp_path / "out", capsys)
    assert code == 2 and "\n" not in err
    assert f"{path}: the {record.length}-byte record at byte {record.offset} fails its " \
           f"{algorithm} check" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, algorithm", [(".metadata", "xxh3_64"), ("common.pt", "crc32")])
def test_a_flipped_byte_in_a_dist_index_or_common_file_is_detected(small_checkpoints, tmp_path,
                                                                   capsys, name, algorithm):
    """mlmega writes a manifest for torch's index (a plain pickle); common.pt has its CRC32s."""
    ckpt = copy_of(small_checkpoints["torch_dist"], tmp_path / "ckpt")
    path = ckpt / "iter_0000003" / name
    if name == ".metadata":
        offset, length = 0, path.stat().st_size
    else:
        record = file_records(path)["data.pkl"]
        offset, length = record.offset, record.length
    flip_byte(path, offset + length // 2)
    code, err = _convert(ckpt, tmp_path / "out", capsys)
    assert code == 2 and "\n" not in err
    assert f"{path}: the {length}-byte record at byte {offset} fails its {algorithm} check" in err


def _verify(ckpt: Path, capsys) -> tuple[int, str, str]:
    code = main(["verify", str(ckpt)])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_verify_checks_bytes_a_conversion_never_reads(small_checkpoints, tmp_path, capsys, fmt):
    """Damage in TP rank 1's word-embedding rows (vocabulary padding at TP=1, never read by a
    conversion to it) converts cleanly, but ``mlmega verify`` finds it."""
    ckpt = copy_of(small_checkpoints[fmt], tmp_path / "ckpt")
    code, out, _ = _verify(ckpt, capsys)
    assert code == 0, out
    assert "match their checksums" in out and "without checksums" not in out
    if fmt == "torch":
        path = ckpt / "iter_0000003/mp_rank_01_000/model_optim_rng.pt"
        record = file_records(path)["data/0"]
        offset, length = record.offset, record.length
    else:
        path = ckpt / "iter_0000003" / "__1_0.distcp"
        records = json.loads(Path(str(path) + MANIFEST_SUFFIX).read_text())["records"]
        offset, length, _ = max(records, key=lambda r: r[1])
    flip_byte(path, offset + length - 1)
    assert _convert(ckpt, tmp_path / "out", capsys)[0] == 0
    code, _, err = _verify(ckpt, capsys)
    assert code == 2 and "\n" not in err
    assert err.startswith(f"mlmega: error: {path}: the {length}-byte record at byte {offset} "
                          f"fails its xxh3_64 check")


def test_verify_says_which_files_have_no_checksums(small_checkpoints, tmp_path, capsys):
    ckpt = copy_of(small_checkpoints["torch"], tmp_path / "ckpt")
    path = ckpt / SHARD
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(torch.load(path, weights_only=False), path)
    finally:
        torch.serialization.set_crc32_options(True)
    Path(str(path) + MANIFEST_SUFFIX).unlink()
    code, out, _ = _verify(ckpt, capsys)
    assert code == 0
    assert out.rstrip().endswith("; without checksums, nothing to check in: "
                                 "iter_0000003/mp_rank_01_000/model_optim_rng.pt"), out


@pytest.mark.parametrize("written_by", ["mlmega", "torch.save"])
def test_a_verified_shard_is_parsed_and_checked_once(small_checkpoints, tmp_path, monkeypatch,
                                                     written_by):
    """Opening a shard (its pickle checked), checking it whole (as a resume does) and reading
    every tensor: its zip directory is parsed once and each record hashed once."""
    from mlmega.checkpoint import integrity
    from mlmega.checkpoint.torch_format import TorchCheckpoint
    from mlmega.models.params import param_index
    from mlmega.train.checkpointing import verify_rank_files

    _, path, _ = _shard_written_by(small_checkpoints, tmp_path, written_by)
    parsed, hashed = [], []
    real_parse, real_confirm = integrity.zip_records, integrity.RecordChecks.confirm

    def parse(fd, base, length):
        parsed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_parse(fd, base, length)

    def confirm(self, record, pieces):
        hashed.append((str(self.path), record.offset))
        return real_confirm(self, record, pieces)

    monkeypatch.setattr(integrity, "zip_records", parse)
    monkeypatch.setattr(integrity.RecordChecks, "confirm", confirm)
    ckpt = TorchCheckpoint.open(path.parents[2])
    tp_rank, pp_rank = 1, 0  # SHARD: not the rank the open read first
    assert ckpt.shard_path(tp_rank, pp_rank) == path
    verify_rank_files(ckpt, tp_rank, pp_rank, optimizer_shards=False)  # as a resume does
    ckpt.shard(tp_rank, pp_rank)
    for name, (spec, layer) in param_index(ckpt.layout.cfg).items():
        if layer is None and spec.pp_stage == "first" or layer in ckpt.layout.pp_stage_layers(0):
            ckpt.read_shard(name, tp_rank)

    assert parsed.count(str(path)) == 1
    mine = [offset for file, offset in hashed if file == str(path)]
    tensors_and_pickle = {r.offset for name, r in file_records(path).items()
                          if name == "data.pkl" or name.startswith("data/")}
    assert len(mine) == len(set(mine)) and set(mine) >= tensors_and_pickle
    assert len(tensors_and_pickle) > 10
