"""The private torch and submitit APIs mlmega relies on (mlmega.compat) exist and behave as used,
on the installed versions."""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile

import torch

from mlmega import compat


def test_zip_writer_writes_what_torch_load_reads(tmp_path):
    assert compat.storage_alignment() == 64
    tensor = torch.arange(6, dtype=torch.float32)
    sink = io.BytesIO()
    writer = compat.PyTorchFileWriter(sink, False, compat.storage_alignment())
    buffer = io.BytesIO()
    torch.save(tensor, buffer)  # its records, rewritten through the writer
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        for info in archive.infolist():
            name = info.filename.split("/", 1)[1]
            data = archive.read(info.filename)
            writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    (tmp_path / "t.pt").write_bytes(sink.getvalue())
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True), tensor)


def test_storage_reductions_match_torch(tmp_path):
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.uint16):
        tensor = torch.zeros(3, dtype=dtype)
        rebuild = tensor.__reduce_ex__(2)[0]
        expected = compat.rebuild_tensor_v3 if compat.uses_untyped_storage(dtype) else \
            compat.rebuild_tensor_v2
        assert rebuild is expected, (dtype, rebuild)
        if not compat.uses_untyped_storage(dtype):
            with warnings.catch_warnings():  # TypedStorage is deprecated; torch.save still uses it
                warnings.simplefilter("ignore")
                typed = torch.storage.TypedStorage(3, dtype=dtype)
            untyped, storage_type, numel = compat.typed_storage_parts(typed)
            assert isinstance(untyped, torch.UntypedStorage) and numel == 3
            assert storage_type is getattr(torch, compat.typed_storage_name(dtype))
    storage = torch.zeros(2).untyped_storage()
    assert compat.storage_key(storage) == compat.storage_key(storage)
    assert pickle.loads(pickle.dumps(compat.rebuild_tensor_v2)) is compat.rebuild_tensor_v2


def test_dist_checkpoint_helpers(tmp_path):
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, TensorProperties,
                                                       TensorStorageMetadata)

    info = compat.storage_info("__0_0.distcp", 10, 20)
    assert (info.relative_path, info.offset, info.length) == ("__0_0.distcp", 10, 20)
    md = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([4, 3]),
                               [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 3])),
                                ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([2, 3]))])
    items = compat.chunk_read_items("w", md, (1, 0), (2, 3))
    assert sorted(tuple(i.lengths) for i in items) == [(1, 3), (1, 3)]


def test_submitit_script_and_entry_point(tmp_path):
    import submitit

    script = compat.make_sbatch_string(command="echo hi", folder=tmp_path, job_name="x", nodes=1)
    assert "#SBATCH --job-name=x" in script and "echo hi" in script
    executor = compat.slurm_executor_running(lambda folder, python: f"{python} run {folder}")(
        folder=tmp_path, python="PY")
    assert isinstance(executor, submitit.SlurmExecutor)
    assert executor._submitit_command_str == f"PY run {executor.folder}"
    from submitit.core.submission import submitit_main

    assert callable(submitit_main)
