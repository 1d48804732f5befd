"""Writes never lose data: ``--overwrite`` replaces only a checkpoint that overlaps no source, in
one step, and an interrupted replacement is put back on the next run; a killed conversion takes
its workers with it and its staging directory is removed by the next run; a full disk is one line
naming the file, with nothing published."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlmega.checkpoint import atomic
from mlmega.checkpoint.formats import open_checkpoint, save_full_state
from mlmega.checkpoint.layout import ShardLayout
from mlmega.checkpoint.directory import TRACKER
from mlmega.checkpoint.torch_format import TorchCheckpoint
from mlmega.cli.main import main
from mlmega.config.errors import CheckpointError
from mlmega.config.model import ModelConfig
from tests.helpers import make_model_state

@pytest.fixture
def source(small_checkpoints) -> Path:
    return small_checkpoints["torch"]


def _convert(src: Path, dst: Path, capsys, *options: str) -> tuple[int, str]:
    code = main(["convert", "reshard", "--src", str(src), "--dst", str(dst), "--target-tp", "1",
                 *options])
    return code, capsys.readouterr().err.strip()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_overwrite_refuses_a_destination_overlapping_the_source(source, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    for dst in (ckpt, ckpt / "iter_0000003" / "out", tmp_path):
        code, err = _convert(ckpt, dst, capsys, "--overwrite")
        assert code == 2
        assert err == (f"mlmega: error: --dst {dst} overlaps the source {ckpt} (one contains "
                       f"the other); choose a destination outside it")
    assert TorchCheckpoint.open(ckpt).layout.tp == 2 and not (ckpt / "iter_0000003" / "out").exists()


def test_overwrite_replaces_only_a_checkpoint(source, tmp_path, capsys):
    dst = tmp_path / "precious"
    (dst / "photos").mkdir(parents=True)
    (dst / "thesis.txt").write_text("years of work")
    (dst / "latest_checkpointed_iteration.txt").write_text("3")
    code, err = _convert(source, dst, capsys, "--overwrite")
    assert code == 2
    assert err == (f"mlmega: error: {dst}: not a checkpoint that --overwrite may replace: it "
                   f"holds photos/, thesis.txt")
    assert (dst / "thesis.txt").read_text() == "years of work" and (dst / "photos").is_dir()
    # a checkpoint is replaced in one step, and its siblings are left alone
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    (sibling / "notes.txt").write_text("keep")
    out = tmp_path / "out"
    assert _convert(source, out, capsys, "--target-pp", "1")[0] == 0
    code, err = _convert(source, out, capsys, "--overwrite", "--target-pp", "2")
    assert code == 0, err
    assert TorchCheckpoint.open(out).layout.pp == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "precious", "sibling"]
    assert (sibling / "notes.txt").read_text() == "keep"



def test_overwrite_replaces_every_file_mlmega_writes(source, tmp_path, capsys):
    """Each format's files (checksum manifests included) are a checkpoint's: --overwrite may
    replace them."""
    out = tmp_path / "out"
    for fmt in ("torch", "torch_dist"):
        assert _convert(source, out, capsys, "--format", fmt, "--overwrite")[0] == 0
        code, err = _convert(source, out, capsys, "--format", fmt, "--overwrite",
                             "--target-pp", "1")
        assert code == 0, err
        assert open_checkpoint(out).layout.pp == 1

def test_replacing_without_an_atomic_exchange_also_works(source, tmp_path, capsys, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is unsupported (some network filesystems), the old
    checkpoint is moved aside first and deleted after."""
    out = tmp_path / "out"
    assert _convert(source, out, capsys, "--target-pp", "1")[0] == 0
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    assert _convert(source, out, capsys, "--overwrite", "--target-pp", "2")[0] == 0
    assert TorchCheckpoint.open(out).layout.pp == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_interrupted_replacement_is_recovered_on_the_next_run(source, tmp_path, capsys):
    """The state a kill between the two renames leaves: the old checkpoint moved aside, no
    destination, the new one still staged. The next run puts the old one back."""
    host, pid = socket.gethostname(), _dead_pid()
    out = tmp_path / "out"
    assert _convert(source, out, capsys, "--target-pp", "1")[0] == 0
    old = tmp_path / f".out.old-{host}-{pid}"
    staged = tmp_path / f".out.tmp-{host}-{pid}-abcd1234"
    os.rename(out, old)
    shutil.copytree(old, staged)
    foreign = tmp_path / ".out.tmp-elsewhere-1-abcd1234"  # another host's: may be live
    foreign.mkdir()
    code, err = _convert(source, out, capsys, "--target-pp", "2")
    assert code == 2
    assert err.splitlines() == [
        f"mlmega: {out}: restored (process {pid} was replacing it and stopped after moving it "
        f"to {old.name})",
        f"mlmega: {foreign}: left by process 1 on elsewhere, which may still be running; "
        f"remove it when it is not",
        f"mlmega: {staged}: removed (left by process {pid}, which is no longer running)",
        f"mlmega: error: {out} already exists; pass --overwrite to replace it"]
    assert TorchCheckpoint.open(out).layout.pp == 1, "the old checkpoint, intact"
    assert foreign.is_dir() and not staged.exists() and not old.exists()
    # a replacement that got past its second rename: the old copy is just removed
    old.mkdir()
    assert _convert(source, out, capsys, "--target-pp", "2", "--overwrite")[0] == 0
    assert not old.exists() and TorchCheckpoint.open(out).layout.pp == 2


def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_killed_conversion_takes_its_workers_and_the_next_run_removes_its_staging(tmp_path,
                                                                                 model_parallel):
    big = ModelConfig(arch="gpt", num_layers=8, hidden_size=512, num_attention_heads=8,
                      vocab_size=1000, max_sequence_length=64)
    save_full_state(make_model_state(big, seed=0), ShardLayout(big, 2, 2), tmp_path / "src")
    dst = tmp_path / "dst"
    argv = [sys.executable, "-m", "mlmega", "convert", "decoalesce", "--src",
            str(tmp_path / "src"), "--dst", str(dst), "--width-factor", "2", "--depth-factor",
            "2", "--workers", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.monotonic() + 120, set()
    while time.monotonic() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        if len(workers) >= 2 and list(tmp_path.glob(".dst.tmp-*/iter_*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None and len(workers) >= 2, "the conversion must be killed midway"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while any(_running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(w) for w in workers), "workers must die with their coordinator"
    assert not dst.exists(), "killed before publishing: the destination must not exist"
    [staging] = tmp_path.glob(".dst.tmp-*")
    assert staging.name.startswith(f".dst.tmp-{socket.gethostname()}-{proc.pid}-")
    assert not (staging / TRACKER).exists()
    with pytest.raises(CheckpointError):
        TorchCheckpoint.open(staging)
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"mlmega: {staging}: removed (left by process {proc.pid}, which is no longer " \
           f"running)" in rerun.stderr
    assert not list(tmp_path.glob(".dst.*")) and TorchCheckpoint.open(dst).layout.tp == 2


_LIMITED = """
import resource, signal, sys
from mlmega.cli.main import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: write() fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("fmt, file", [("torch", "mp_rank_00/model_optim_rng.pt"),
                                       ("torch_dist", "__0_0.distcp")])
def test_a_full_disk_is_one_line_and_nothing_is_published(source, tmp_path, fmt, file):
    dst = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", _LIMITED, str(20_000), "convert", "reshard",
                          "--src", str(source), "--dst", str(dst), "--target-tp", "1",
                          "--target-pp", "1", "--format", fmt],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mlmega: error: {tmp_path}/.out.tmp-")
    assert last.endswith(f"/iter_0000003/{file}: cannot write ({os.strerror(27)}); nothing was "
                         f"published to {dst}")
    assert "Traceback" not in run.stderr
    assert not dst.exists() and not list(tmp_path.glob(".out.*"))
