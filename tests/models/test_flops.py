"""mlmega's FLOPs count against Megatron-LM core_v0.16.1's ``num_floating_point_operations``.

The peer's function is taken from its source file (megatron/training/training.py in the peer
checkout, parsed with ``ast``: importing the module drags in its whole training stack) and called
on an ``args`` namespace built from the model's Megatron arguments.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlmega.config.model import ModelConfig
from mlmega.models.flops import training_flops_per_token

PEER = Path("/work/shared/peers/megatron-lm-core_v0.16.1/megatron/training/training.py")


@pytest.fixture(scope="module")
def megatron_flops():
    if not PEER.exists():
        pytest.skip(f"peer Megatron-LM not found at {PEER}")
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
        is_linear_attention_variant)

    tree = ast.parse(PEER.read_text())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                and n.name == "num_floating_point_operations")
    namespace = {"is_linear_attention_variant": is_linear_attention_variant}
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(PEER), "exec"), namespace)
    return namespace["num_floating_point_operations"]


def megatron_args(cfg: ModelConfig, seq_length: int) -> SimpleNamespace:
    args = cfg.to_megatron_args()
    args.update(seq_length=seq_length, padded_vocab_size=cfg.padded_vocab_size(1),
                is_hybrid_model=False, num_experts=None, mtp_num_layers=None,
                multi_latent_attention=False, attention_output_gate=False,
                experimental_attention_variant=None, moe_ffn_hidden_size=None,
                moe_shared_expert_intermediate_size=None)
    return SimpleNamespace(**args)


GPTS = {
    "4L-256": dict(num_layers=4, hidden_size=256, num_attention_heads=8, vocab_size=2048,
                   max_sequence_length=128),
    "gpt2-small s1024": dict(num_layers=12, hidden_size=768, num_attention_heads=12,
                             vocab_size=50257, max_sequence_length=1024),
    "GQA SwiGLU s8192": dict(num_layers=8, hidden_size=1024, num_attention_heads=16,
                             num_query_groups=4, activation="swiglu", ffn_hidden_size=2816,
                             vocab_size=32000, max_sequence_length=8192,
                             normalization="RMSNorm", position_embedding="rope"),
}


@pytest.mark.parametrize("name", sorted(GPTS))
def test_gpt_flops_equal_megatron_lm(megatron_flops, name):
    cfg = ModelConfig.from_dict(dict(arch="gpt", **GPTS[name]))
    seq, batch = cfg.max_sequence_length, 16
    ours = training_flops_per_token(cfg, seq) * seq * batch
    assert ours == pytest.approx(megatron_flops(megatron_args(cfg, seq), batch), rel=1e-12)


def test_bert_counts_full_attention(megatron_flops):
    """BERT attends both ways: the count is Megatron-LM's plus the half of s x s it leaves out."""
    cfg = ModelConfig.from_dict(dict(arch="bert", num_layers=4, hidden_size=256,
                                     num_attention_heads=8, vocab_size=2048,
                                     max_sequence_length=128))
    seq, batch = 128, 4
    megatron = megatron_flops(megatron_args(cfg, seq), batch)
    uncounted_half = 3 * 2 * 2 * cfg.num_layers * cfg.hidden_size * seq / 2 * seq * batch
    assert training_flops_per_token(cfg, seq) * seq * batch == pytest.approx(
        megatron + uncounted_half, rel=1e-12)
