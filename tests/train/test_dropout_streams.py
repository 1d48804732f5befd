"""Dropout under tensor parallelism: attention dropout draws from megatron's per-TP-rank RNG stream
(``model_parallel_cuda_manual_seed``; on CPU through the CPU shims), so TP ranks, which hold
different heads, drop independently, as the heads of one TP=1 rank do.

Each mask is read off a real :class:`SDPAttention` forward: queries and keys are zero (uniform
attention probabilities) and the values are the identity, so each output element is one attention
probability, zero where dropout removed it."""

from __future__ import annotations

import pytest
import torch

from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.enums import AttnMaskType

from mlmega.config.model import ModelConfig
from mlmega.models.attention import SDPAttention
from mlmega.models.build import transformer_config
from mlmega.parallel.setup import seed_random_generators
from tests.multiproc import run_ranks

SEQ, BATCH, HEADS, P = 64, 8, 4, 0.5


def kept_probabilities(tp: int = 1) -> torch.Tensor:
    """[s, b, heads of this TP rank, s]: which attention probabilities survived dropout."""
    cfg = ModelConfig.from_dict(dict(arch="gpt", num_layers=1, hidden_size=HEADS * SEQ,
                                     num_attention_heads=HEADS, vocab_size=128,
                                     max_sequence_length=SEQ))
    attention = SDPAttention(transformer_config(cfg, tp), 1, AttnMaskType.no_mask, "self",
                             attention_dropout=P)
    heads = HEADS // tp
    q = torch.zeros(SEQ, BATCH, heads, SEQ)
    v = torch.eye(SEQ)[:, None, None, :].expand(SEQ, BATCH, heads, SEQ)
    default_stream = torch.get_rng_state()
    out = attention(q, q, v, None)
    assert torch.equal(torch.get_rng_state(), default_stream), \
        "attention dropout must not draw from the default (hidden dropout) stream"
    return out.view(SEQ, BATCH, heads, SEQ) != 0


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


def test_a_tp_ranks_stream_is_its_own(model_parallel):
    """megatron's tracker seeded for TP rank 0 and rank 1 in one process: different masks, each
    deterministic, each dropping P of the probabilities."""
    def kept(tp_rank: int) -> torch.Tensor:
        model_parallel_cuda_manual_seed(5, tp_rank=tp_rank)
        return kept_probabilities()

    try:
        rank0, rank1, again = kept(0), kept(1), kept(0)
    finally:
        seed_random_generators(1234)  # the session's state, as the fixture left it
    assert torch.equal(again, rank0)
    for mask in (rank0, rank1):
        assert mask.float().mean().item() == pytest.approx(1 - P, abs=0.01)
    assert agreement(rank0, rank1) == pytest.approx(0.5, abs=0.02)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_tp2_ranks_drop_independently_as_tp1_heads_do():
    """Real TP=1 and TP=2 jobs (gloo, megatron parallel state, the same seed on every rank): the
    masks of heads 0 and 2 (at TP=2: each rank's first head) agree as independent masks do
    (P^2 + (1-P)^2 = 0.5); with one stream for all ranks they would agree everywhere."""
    (tp1,) = run_ranks(kept_probabilities, 1, 1, 1)
    rank0, rank1 = run_ranks(kept_probabilities, 2, 1, 2)
    for mask in (tp1, rank0, rank1):
        assert mask.float().mean().item() == pytest.approx(1 - P, abs=0.01)
    within_tp1 = agreement(tp1[:, :, 0], tp1[:, :, 2])
    across_tp2 = agreement(rank0[:, :, 0], rank1[:, :, 0])
    assert within_tp1 == pytest.approx(0.5, abs=0.02)
    assert across_tp2 == pytest.approx(within_tp1, abs=0.03)


def default_stream_draws() -> tuple[int, int, torch.Tensor]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            torch.rand(8))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pipeline_stages_seed_their_own_default_stream():
    """Megatron-LM's seed offset (seed + 100 x pipeline rank): hidden dropout, drawn from the
    default stream, differs between pipeline stages and is equal across the TP ranks of a stage
    (whose activations are replicated)."""
    draws = {(t, p): x for t, p, x in run_ranks(default_stream_draws, 2, 2)}
    assert torch.equal(draws[0, 0], draws[1, 0]) and torch.equal(draws[0, 1], draws[1, 1])
    assert not torch.equal(draws[0, 0], draws[0, 1])
    assert torch.equal(draws[0, 1], torch.rand(8, generator=torch.Generator().manual_seed(1334)))
