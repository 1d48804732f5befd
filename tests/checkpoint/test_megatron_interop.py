"""Megatron-LM (core_v0.16.1) reads mlmega's checkpoints and mlmega reads Megatron-LM's, through
real files and Megatron-LM's own converter (tools/checkpoint, loader core -> saver core, which
builds Megatron-LM's models with its model providers and loads with ``load_checkpoint``): mlmega
writes TP/PP > 1, Megatron-LM re-shards it, mlmega reads the result, and every tensor comes back
bit-exact. Its training path loads mlmega's files and computes mlmega's logits."""

from __future__ import annotations

import json

import pytest
import torch

from mlmega.checkpoint.convert import run_conversion
from mlmega.checkpoint.convert_plan import plan_conversion
from mlmega.checkpoint.formats import load_full_state, save_full_state
from mlmega.checkpoint.formats import open_checkpoint
from mlmega.checkpoint.layout import ShardLayout
from mlmega.checkpoint.verify import verify_checkpoint
from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig
from tests.checkpoint.megatron_peer import megatron_convert, megatron_load
from tests.checkpoint.test_vocab import as_megatron_training_saves, random_state

pytestmark = pytest.mark.slow

GPT_RICH = ModelConfig(arch="gpt", num_layers=4, hidden_size=32, num_attention_heads=4,
                       num_query_groups=2, activation="swiglu", tie_embeddings=False,
                       position_embedding="rope", normalization="RMSNorm", norm_epsilon=1e-6,
                       add_bias_linear=False, vocab_size=200, max_sequence_length=16)
GPT_TIED = ModelConfig(arch="gpt", num_layers=4, hidden_size=32, num_attention_heads=4,
                       vocab_size=200, max_sequence_length=16)
BERT = ModelConfig(arch="bert", num_layers=2, hidden_size=32, num_attention_heads=4,
                   bert_binary_head=True, vocab_size=200, max_sequence_length=16)
IDS = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))  # megatron_load's
# What Megatron-LM's converter does not carry at this tag (tools/checkpoint/schema_core.py has no
# entry for them): the saver writes its model's own, uninitialised (--no-initialization) memory.
NOT_CARRIED = {"bert": {"embedding.tokentype_embeddings.weight", "output_layer.bias"}, "gpt": set()}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaN is equal to itself there: the converter's saver leaves the tensors
    it does not carry uninitialised)."""
    return tensor.contiguous().view(torch.uint8)


def assert_same(got: dict, expected: dict, skip: set = frozenset()) -> None:
    """Bit-exact: same names, shapes, dtypes and bytes (except ``skip``)."""
    assert set(got) == set(expected)
    differ = [k for k in expected if k not in skip and (
        got[k].shape != expected[k].shape or got[k].dtype != expected[k].dtype
        or not torch.equal(bits(got[k]), bits(expected[k])))]
    assert not differ, f"not bit-exact: {differ}"


@pytest.mark.parametrize("cfg,src_layout,fmt,dst_layout", [
    (GPT_RICH, (2, 2), "torch", (1, 1)),
    (GPT_TIED, (1, 1), "torch_dist", (2, 2)),
    (BERT, (2, 1), "torch", (1, 1)),
], ids=["gpt-untied-gqa-swiglu-rope-rms-torch-tp2pp2", "gpt-tied-torch_dist-to-tp2pp2",
        "bert-binary-tied-torch-tp2"])
def test_round_trip_through_megatron_lm(tmp_path, cfg, src_layout, fmt, dst_layout):
    """mlmega -> Megatron-LM's converter -> mlmega: the args need no filling, every tensor is
    bit-exact (the padding rows too), and mlmega reshards Megatron-LM's output back exactly."""
    state = random_state(cfg, seed=3)
    save_full_state(state, ShardLayout(cfg, *src_layout), tmp_path / "mlmega", iteration=7, fmt=fmt)
    megatron = megatron_convert(tmp_path / "mlmega", tmp_path / "megatron", cfg.arch.upper(),
                                *dst_layout)
    ckpt = open_checkpoint(megatron)
    assert (ckpt.layout.tp, ckpt.layout.pp, ckpt.iteration) == (*dst_layout, 7)
    # every file of both has checksums: mlmega's manifests, Megatron-LM's zip CRC32s
    for root in (tmp_path / "mlmega", megatron):
        assert all(f.records for f in verify_checkpoint(root)), root
    assert ckpt.layout.cfg.replace(source="") == cfg  # norm eps, GQA, vocab... survive the args
    got, _ = load_full_state(megatron)
    assert_same(got, state, NOT_CARRIED[cfg.arch])
    run_conversion(plan_conversion("reshard", megatron, tmp_path / "back", target_tp=src_layout[0],
                                   target_pp=src_layout[1], fmt=fmt))
    back, layout = load_full_state(tmp_path / "back")
    assert (layout.tp, layout.pp) == src_layout
    assert_same(back, got)


def test_megatron_lm_default_tp2_vocabulary(tmp_path):
    """Megatron-LM's default TP2 output for GPT-2's vocabulary (50257 padded to 50432,
    args.vocab_size None) is read as the truth of its shards; the true vocabulary must be given,
    and is said."""
    cfg = ModelConfig(arch="gpt", num_layers=2, hidden_size=16, num_attention_heads=2,
                      vocab_size=50257, max_sequence_length=16, tie_embeddings=False)
    state = random_state(cfg, seed=4)
    save_full_state(state, ShardLayout(cfg), tmp_path / "mlmega")
    as_megatron_training_saves(tmp_path / "mlmega")
    megatron = megatron_convert(tmp_path / "mlmega", tmp_path / "megatron", "GPT", 2, 1,
                                true_vocab_size=50257)
    with pytest.raises(ConfigError, match=r"model_optim_rng\.pt: args\.vocab_size is None and "
                                          r"padded_vocab_size=50432 \(shards: 50432 rows\): the "
                                          r"true vocabulary is unknown; give it with --vocab-size"):
        open_checkpoint(megatron)
    vocab = tmp_path / "vocab.json"  # GPT-2's vocab.json: what Megatron-LM's GPT2BPETokenizer counts
    vocab.write_text(json.dumps({f"t{i}": i for i in range(50257)}))
    ckpt = open_checkpoint(megatron, tokenizer=vocab)
    assert (ckpt.layout.cfg.vocab_size, ckpt.layout.padded_vocab) == (50257, 50432)
    assert ckpt.vocab_source == f"--tokenizer {vocab}"
    assert open_checkpoint(megatron, vocab_size=50257).vocab_source == "--vocab-size"
    logs = []
    run_conversion(plan_conversion("reshard", megatron, tmp_path / "tp1", target_tp=1,
                                   vocab_size=50257), log=logs.append)
    assert logs[0] == ("convert reshard: vocabulary 50257 (from --vocab-size), padded to 50304 "
                       "rows for TP=1")
    out = open_checkpoint(tmp_path / "tp1")  # the output's args say the vocabulary again
    assert (out.args.vocab_size, out.args.padded_vocab_size, out.args.tokenizer_type) == \
        (50257, 50304, "GPT2BPETokenizer")
    got, _ = load_full_state(tmp_path / "tp1")
    for name, tensor in state.items():  # Megatron-LM's padding rows repeat the last real row
        vocab_rows = name.startswith(("embedding.word", "output_layer"))
        rows = slice(0, 50257) if vocab_rows else slice(None)
        assert torch.equal(got[name][rows], tensor[rows]), name


@pytest.mark.multiprocess
@pytest.mark.parametrize("cfg,fmt", [(GPT_RICH, "torch"), (BERT, "torch_dist")],
                         ids=["gpt-untied-gqa-swiglu-rope-rms-torch", "bert-binary-torch_dist"])
def test_megatron_lm_training_loads_mlmega_checkpoints(tmp_path, cfg, fmt, model_parallel):
    """Megatron-LM's training path (args from the checkpoint, its model provider, load_checkpoint,
    strict) loads mlmega's files: the same tensors, and its model computes mlmega's logits. What
    it saves then (torch_dist, args.vocab_size None) mlmega reads bit-exactly."""
    from mlmega.models.build import build_model
    from mlmega.models.state import load_full_state_dict
    from tests.helpers import make_model_state
    from tests.multiproc import forward

    state = make_model_state(cfg, seed=8)  # at realistic scales: the kernels' rounding stays small
    save_full_state(state, ShardLayout(cfg), tmp_path / "mlmega", iteration=3, fmt=fmt)
    loaded = megatron_load(tmp_path / "mlmega", tmp_path / "loaded.pt", cfg.arch.upper(),
                           save=tmp_path / "megatron")
    assert loaded["iteration"] == 3
    assert_same({k: loaded["state"][k] for k in state}, state)
    model = build_model(cfg)
    load_full_state_dict(model, state)
    model.eval()
    with torch.no_grad():
        expected = forward(model, cfg, IDS)
    torch.testing.assert_close(loaded["logits"], expected, rtol=0, atol=2e-5)
    with pytest.raises(ConfigError, match=r"common\.pt: args\.vocab_size is None"):
        open_checkpoint(tmp_path / "megatron")
    saved, layout = load_full_state(tmp_path / "megatron", vocab_size=cfg.vocab_size)
    assert layout.cfg.replace(source="") == cfg
    assert_same(saved, state)
