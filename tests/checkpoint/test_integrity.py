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
from mlmega.checkpoint.integrity import MANIFEST_SUFFIX, zip_records
from mlmega.checkpoint.directory import TRACKER
from mlmega.cli.main import main
from tests.checkpoint.conftest import SMALL_GPT, copy_of
from tests.helpers import make_model_state

SHARD = "iter_0000003/mp_rank_01_000/model_optim_rng.pt"


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0x40]))


def _convert(src: Path, dst: Path, capsys, *options: str) -> tuple[int, str]:
    code = main(["convert", "reshard", "--src", str(src), "--dst", str(dst), "--target-tp", "1",
                 *options])
    return code, capsys.readouterr().err.strip()


def _records(path: Path) -> dict:
    fd = os.open(path, os.O_RDONLY)
    try:
        return zip_records(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _largest_record(path: Path):
    """The file's largest tensor record but the word embeddings' (data/0, whose rows on this TP
    rank are vocab padding, never read): a TP-split weight, read by every conversion."""
    return max((r for name, r in _records(path).items()
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
    _flip(path, record.offset + record.length // 2)
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
    _flip(path, offset + length // 2)
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
    record = _records(path)["data.pkl"]
    _flip(path, record.offset + record.length // 2)
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
    offset, length = (0, path.stat().st_size) if name == ".metadata" else \
        (_records(path)["data.pkl"].offset, _records(path)["data.pkl"].length)
    _flip(path, offset + length // 2)
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
        record = _records(path)["data/0"]
        offset, length = record.offset, record.length
    else:
        path = ckpt / "iter_0000003" / "__1_0.distcp"
        records = json.loads(Path(str(path) + MANIFEST_SUFFIX).read_text())["records"]
        offset, length, _ = max(records, key=lambda r: r[1])
    _flip(path, offset + length - 1)
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
