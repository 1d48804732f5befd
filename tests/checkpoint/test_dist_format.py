"""megatron-core's torch_dist checkpoints: mlmega's lazy reader and per-rank writer against real
megatron-core models (dist_checkpointing.save / load in a 2-rank gloo job), torch <-> torch_dist
conversion round trips, and bad files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

from mlmega.checkpoint.convert import run_conversion
from mlmega.checkpoint.convert_plan import plan_conversion
from mlmega.checkpoint.dist_format import (COMMON_FILE, CONFIG_FILE, DistCheckpoint,
                                           METADATA_FILE, finalize_dist, rank_chunks,
                                           write_dist_rank)
from mlmega.checkpoint.formats import load_full_state, open_checkpoint, save_full_state
from mlmega.checkpoint.integrity import MANIFEST_SUFFIX
from mlmega.checkpoint.layout import ShardLayout
from mlmega.checkpoint.directory import TRACKER, iteration_dir_name
from mlmega.checkpoint.torch_format import TorchCheckpoint
from mlmega.config.errors import CheckpointError
from mlmega.models.params import param_shapes
from tests.helpers import VARIANTS, variant

GPT = "gpt-gqa-swiglu-tied-rope-rms-bias"  # SwiGLU + GQA, tied embeddings
GPT_UNTIED = "gpt-gqa-swiglu-untied-rope-rms-nobias"
BERT = "bert-untied-binary"  # untied output layer with a vocab-parallel bias, binary head
# Layouts our writer saves at before a TP=2, PP=1 megatron-core model loads the result.
WRITE_LAYOUTS = {GPT: (1, 2), GPT_UNTIED: (2, 2), BERT: (1, 1)}


def random_state(cfg, seed: int) -> dict[str, torch.Tensor]:
    """Canonical full tensors (vocab padding rows included) with distinct random values."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in param_shapes(cfg).items()}


def mcore_chunks(sharded_state_dict) -> set[tuple]:
    """(key, global shape, offset, local shape) of every main-replica piece megatron-core saves."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (ShardedObject, apply_factories,
                                                          is_main_replica)

    apply_factories(sharded_state_dict)
    found = set()
    for item in nested_values(sharded_state_dict):
        if not is_main_replica(item.replica_id):
            continue
        if isinstance(item, ShardedObject):
            found.add((item.unique_key,))
        else:
            local = (1,) * item.prepend_axis_num + tuple(item.data.shape)
            found.add((item.key, tuple(item.global_shape), tuple(item.global_offset), local))
    return found


def our_chunks(layout: ShardLayout, tp_rank: int, pp_rank: int) -> set[tuple]:
    model = {p.local_name: torch.zeros(layout.local_shape(p.spec))
             for p in layout.pp_stage_params(pp_rank)}
    return {(c.key, c.global_shape, c.offsets, tuple(c.data.shape)) if c.is_tensor else (c.key,)
            for c in rank_chunks(layout, tp_rank, pp_rank, model)}


# -- single process --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_writer_chunks_are_megatron_cores(name, model_parallel):
    """At TP=1, PP=1 our writer stores exactly the keys, shapes and offsets megatron-core does."""
    from mlmega.models.build import build_model

    cfg = variant(name)
    expected = mcore_chunks(build_model(cfg).sharded_state_dict())
    assert our_chunks(ShardLayout(cfg), 0, 0) == expected


@pytest.mark.parametrize("name", [GPT, BERT])
def test_torch_to_dist_and_back_is_exact(tmp_path, name):
    cfg = variant(name)
    state = random_state(cfg, seed=1)
    save_full_state(state, ShardLayout(cfg, 2, 2), tmp_path / "torch22", iteration=7)
    run_conversion(plan_conversion("reshard", tmp_path / "torch22", tmp_path / "dist22",
                                   fmt="torch_dist"), log=lambda *_: None)
    dist = open_checkpoint(tmp_path / "dist22")
    assert isinstance(dist, DistCheckpoint)
    assert (dist.layout.tp, dist.layout.pp, dist.iteration) == (2, 2, 7)
    assert dist.args.mlmega_converted_by == "reshard"
    data = [f"__{r}_0.distcp" for r in range(4)]
    assert sorted(p.name for p in dist.directory.iterdir()) == sorted(
        [".metadata", *data, *(name + MANIFEST_SUFFIX for name in [".metadata", *data]), COMMON_FILE,
         CONFIG_FILE]), "one data file (and its checksums) per target rank; no index parts left"
    got, layout = load_full_state(tmp_path / "dist22")
    assert all(torch.equal(got[k], state[k]) for k in state)
    # torch_dist -> torch_dist at another layout, and back to a TP=1, PP=1 torch checkpoint
    run_conversion(plan_conversion("reshard", tmp_path / "dist22", tmp_path / "dist12",
                                   target_tp=1, target_pp=2, fmt="torch_dist"), log=lambda *_: None)
    run_conversion(plan_conversion("reshard", tmp_path / "dist12", tmp_path / "torch11",
                                   target_tp=1, target_pp=1), log=lambda *_: None)
    back = TorchCheckpoint.open(tmp_path / "torch11")
    assert (back.layout.tp, back.layout.pp, back.iteration) == (1, 1, 7)
    again, _ = load_full_state(tmp_path / "torch11")
    assert all(torch.equal(again[k], state[k]) for k in state), "round trip must be bit-exact"


def test_reader_reads_one_layer_at_a_time(tmp_path, monkeypatch):
    cfg = variant(GPT, layers=4)
    state = random_state(cfg, seed=2)
    save_full_state(state, ShardLayout(cfg, 2, 2), tmp_path / "ckpt", fmt="torch_dist")
    ckpt = DistCheckpoint.open(tmp_path / "ckpt")
    loaded = []
    original = torch.load

    def counting_load(*args, **kwargs):
        out = original(*args, **kwargs)
        loaded.append(out.numel())
        return out

    monkeypatch.setattr(torch, "load", counting_load)
    name = "decoder.layers.2.mlp.linear_fc1.weight"
    assert torch.equal(ckpt.read(name), state[name])
    # the 4 chunks of layer 2 (gate and up halves of both TP ranks), nothing of the other layers
    assert loaded == [state[name].numel() // 4] * 4


def test_failed_writes_leave_nothing(tmp_path):
    cfg = variant(BERT)
    state = random_state(cfg, seed=3)
    del state["binary_head.bias"]
    with pytest.raises(KeyError):
        save_full_state(state, ShardLayout(cfg, 2, 1), tmp_path / "out", fmt="torch_dist")
    assert list(tmp_path.iterdir()) == []
    # finalizing before every rank has written names the missing rank's index part
    layout = ShardLayout(cfg, 2, 1)
    state = random_state(cfg, seed=3)
    model = {p.local_name: layout.split(p.spec, state[p.global_name], 0)
             for p in layout.pp_stage_params(0)}
    write_dist_rank(tmp_path / "partial", layout, 0, 0, model)
    with pytest.raises(CheckpointError, match="mlmega-index-1.json: missing: rank tp1 pp0"):
        finalize_dist(tmp_path / "partial", layout, 0)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _scramble(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


@pytest.mark.parametrize("damage, target, match", [
    (_truncate, "__1_0.distcp", r"__1_0\.distcp: truncated"),
    (os.unlink, "__1_0.distcp", r"__1_0\.distcp: file is missing"),
    (_scramble, "__1_0.distcp", r"__1_0\.distcp: the \d+-byte record at byte \d+ fails its "
                                r"xxh3_64 check"),
    (os.unlink, METADATA_FILE, r"\.metadata: file is missing"),
    (_scramble, METADATA_FILE, r"\.metadata: the \d+-byte record at byte 0 fails its xxh3_64 "
                               r"check"),
    (os.unlink, CONFIG_FILE, r"metadata\.json: file is missing"),
    (os.unlink, COMMON_FILE, r"common\.pt: file is missing"),
    (_truncate, COMMON_FILE, r"common\.pt: bytes 0\.\.\d+ are not a zip archive"),
])
def test_damaged_checkpoints_raise_config_error_naming_the_file(tmp_path, damage, target, match):
    cfg = variant(GPT)
    save_full_state(random_state(cfg, seed=4), ShardLayout(cfg, 2, 1), tmp_path / "ckpt",
                         iteration=3, fmt="torch_dist")
    damage(tmp_path / "ckpt" / iteration_dir_name(3) / target)
    with pytest.raises(CheckpointError, match=match):
        load_full_state(tmp_path / "ckpt")  # open, validate, read every tensor
    with pytest.raises(CheckpointError, match=match):
        run_conversion(plan_conversion("reshard", tmp_path / "ckpt", tmp_path / "out",
                                       target_tp=1), log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_wrong_model_tensors_are_config_errors(tmp_path):
    gpt = variant(GPT)
    save_full_state(random_state(gpt, seed=5), ShardLayout(gpt), tmp_path / "ckpt", fmt="torch_dist")
    with pytest.raises(CheckpointError, match=r"another model than the given model config "
                                              r"\(checkpoint vs given\): num_layers=2 vs 4$"):
        DistCheckpoint.open(tmp_path / "ckpt", cfg=gpt.replace(num_layers=4))
    # args that claim a model the tensors do not hold: the stacks have 2 layers, not 4
    common = tmp_path / "ckpt" / iteration_dir_name(0) / COMMON_FILE
    content = torch.load(common, weights_only=False)
    content["args"] = argparse.Namespace(**{**vars(content["args"]), "num_layers": 4})
    torch.save(content, common)
    with pytest.raises(CheckpointError, match="leading layer axis of num_layers=4"):
        DistCheckpoint.open(tmp_path / "ckpt").validate_tensors()


# -- real megatron-core models in a 2-rank gloo job ------------------------------------------------
def _megatron_side(work: str, tp_of: dict[str, int]) -> dict:
    """On each rank of a TP=2 job: compare our writer's chunks with the model's sharded state dict;
    load our checkpoints into real models; save real models with dist_checkpointing.save."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state as ps
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from mlmega.models.build import build_model

    if not filesystem_async.HAVE_PSUTIL:  # its forked writer would die before reporting: a hang
        filesystem_async._process_memory = lambda: 0
    rank = ps.get_tensor_model_parallel_rank()
    work = Path(work)
    out: dict = {}
    for name in VARIANTS:
        layout = ShardLayout(variant(name), 2, 1)
        out[name, "chunks"] = (mcore_chunks(build_model(layout.cfg, 2, 1).sharded_state_dict()),
                               our_chunks(layout, rank, 0))
    for name in tp_of:
        cfg = variant(name)
        layout = ShardLayout(cfg, 2, 1)
        model = build_model(cfg, 2, 1)
        # (1) our writer's checkpoint (saved at another layout) into a TP=2 model
        root = work / f"{name}-ours"
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                         str(root / iteration_dir_name(5)))
        assert loaded["iteration"] == 5 and loaded["args"].tensor_model_parallel_size == tp_of[name]
        model.load_state_dict(loaded["model"], strict=True)
        out[name, "loaded"] = {k: v.clone() for k, v in model.state_dict().items()
                               if not k.endswith("_extra_state")}
        # (2) megatron-core saves random parameters (as Megatron-LM lays out common state)
        gen = torch.Generator().manual_seed(100 + rank)
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.randn(param.shape, generator=gen))
        out[name, "saved"] = {k: v.clone() for k, v in model.state_dict().items()
                              if not k.endswith("_extra_state")}
        for suffix, metadata in (("mcore", None),
                                 ("mcore-singleton", {"singleton_local_shards": True})):
            root = work / f"{name}-{suffix}"
            directory = root / iteration_dir_name(9)
            if rank == 0:
                directory.mkdir(parents=True)
            dist.barrier()
            args = {k: v for k, v in layout.megatron_args().items() if not k.startswith("mlmega_")}
            state = {"model": model.sharded_state_dict(metadata=metadata),  # Megatron-LM's args:
                     "args": argparse.Namespace(**args, iteration=9),  # no mlmega_arch
                     "checkpoint_version": 3.0, "iteration": 9}
            dist_checkpointing.save(state, str(directory))
            if rank == 0:
                (root / TRACKER).write_text("9")
            dist.barrier()
    return out


@pytest.mark.multiprocess
@pytest.mark.slow
def test_megatron_core_reads_ours_and_we_read_megatron_cores(tmp_path):
    from tests.multiproc import run_ranks

    names = list(WRITE_LAYOUTS)
    states = {}
    for name, (tp, pp) in WRITE_LAYOUTS.items():
        cfg = variant(name)
        states[name] = random_state(cfg, seed=6)
        save_full_state(states[name], ShardLayout(cfg, tp, pp), tmp_path / f"{name}-ours",
                             iteration=5, fmt="torch_dist")
    ranks = run_ranks(_megatron_side, 2, 1, str(tmp_path),
                      {name: tp for name, (tp, _) in WRITE_LAYOUTS.items()})
    for name in VARIANTS:
        for tp_rank, result in enumerate(ranks):
            theirs, ours = result[name, "chunks"]
            assert ours == theirs, f"{name}: TP rank {tp_rank} stores other chunks than megatron"
    for name in names:
        cfg = variant(name)
        layout = ShardLayout(cfg, 2, 1)
        for tp_rank, result in enumerate(ranks):
            # our checkpoint loaded into the TP=2 model: its parameters are the split canonical ones
            loaded = result[name, "loaded"]
            expected = {p.local_name: layout.split(p.spec, states[name][p.global_name], tp_rank)
                        for p in layout.pp_stage_params(0)}
            assert set(loaded) == set(expected)
            for key, tensor in expected.items():
                assert torch.equal(loaded[key], tensor), f"{name}: {key} (TP rank {tp_rank})"
        # megatron-core's own checkpoints (stacked and singleton layouts) read back as the gathered
        # model; the stored vocab is padded for TP=2 and trimmed to the canonical TP=1 padding
        saved = [result[name, "saved"] for result in ranks]
        for suffix in ("mcore", "mcore-singleton"):
            ckpt = open_checkpoint(tmp_path / f"{name}-{suffix}")
            assert isinstance(ckpt, DistCheckpoint)
            assert (ckpt.layout.tp, ckpt.layout.pp, ckpt.iteration) == (2, 1, 9)
            assert ckpt.layout.cfg == cfg
            ckpt.validate_tensors()
            for p in layout.pp_stage_params(0):
                full = layout.gather(p.spec, [shards[p.local_name] for shards in saved])
                assert torch.equal(ckpt.read(p.global_name), full), \
                    f"{name} {suffix}: {p.global_name}"
        if name == GPT:
            stacked = open_checkpoint(tmp_path / f"{name}-mcore")
            assert stacked.tensor_keys["decoder.layers.mlp.linear_fc1.weight"] == (2, 48, 32)
            assert stacked.tensor_keys["embedding.word_embeddings.weight"] == (256, 32)
            single = open_checkpoint(tmp_path / f"{name}-mcore-singleton")
            assert single.tensor_keys["decoder.layers.1.mlp.linear_fc1.weight_v"] == (24, 32)


def _pipeline_side(work: str) -> dict:
    """On each stage of a PP=2 job: every variant's chunks per stage, and our TP=2 checkpoints
    loaded into the stage's real model (the last stage's tied output copy included)."""
    from megatron.core import dist_checkpointing, parallel_state as ps

    from mlmega.models.build import build_model

    stage = ps.get_pipeline_model_parallel_rank()
    out = {}
    for name in VARIANTS:
        layout = ShardLayout(variant(name), 1, 2)
        model = build_model(layout.cfg, 1, 2, pre_process=stage == 0, post_process=stage == 1)
        out[name, "chunks"] = (mcore_chunks(model.sharded_state_dict()),
                               our_chunks(layout, 0, stage))
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                         str(Path(work) / name / iteration_dir_name(0)))
        model.load_state_dict(loaded["model"], strict=True)
        out[name, "loaded"] = {k: v.clone() for k, v in model.state_dict().items()
                               if not k.endswith("_extra_state")}
    return out


@pytest.mark.multiprocess
@pytest.mark.slow
def test_every_variant_loads_into_megatron_core_pipeline_stages(tmp_path):
    from tests.multiproc import run_ranks

    states = {name: random_state(variant(name), seed=7) for name in VARIANTS}
    for name, state in states.items():
        save_full_state(state, ShardLayout(variant(name), 2, 1), tmp_path / name, fmt="torch_dist")
    stages = run_ranks(_pipeline_side, 1, 2, str(tmp_path))
    for name in VARIANTS:
        layout = ShardLayout(variant(name), 1, 2)
        for stage, result in enumerate(stages):
            theirs, ours = result[name, "chunks"]
            assert ours == theirs, f"{name}: stage {stage} stores other chunks than megatron"
            expected = {p.local_name: layout.split(p.spec, states[name][p.global_name], 0)
                        for p in layout.pp_stage_params(stage)}
            loaded = result[name, "loaded"]
            assert set(loaded) == set(expected), name
            for key, tensor in expected.items():
                assert torch.equal(loaded[key], tensor), f"{name}: {key} (stage {stage})"
