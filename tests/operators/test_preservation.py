"""Invariant 4: width de-coalescing preserves the function of a real megatron-core model.

All megatron-core GPT/BERT models are pre-LN. With untied embeddings (embedding out-side, output
layer in-side) width de-coalescing is exact up to float32 rounding. With tied embeddings the shared
matrix is split (E F), which keeps the LM head exact but scales the input embedding by 1/g, so the
logits only stay close. Measured on this file's models and inputs (2 layers, 2 -> 4 or 6 units,
head dim 8, float32, CPU; "custom3" = groups of 3):

  untied, randomised states (norms and biases too; max |logits| 2.7 .. 4.2; bound 1e-5 x scale):
      max |Δlogits| 1.4e-6 .. 6.0e-6 (GPT), 1.5e-6 .. 2.9e-6 (BERT); BERT binary logits 2.4e-7
  tied, megatron-core init (std 0.02; mean |logits| 0.065 .. 0.095), mean |Δ| (max |Δ|):
      gpt-mha-gelu    stacked/adjacent 0.0084 (0.057)   custom3 0.0155 (0.099)
      gpt-gqa-swiglu  stacked/adjacent 0.0179 (0.120)   custom3 0.0336 (0.269)
      bert (both)     stacked/adjacent 0.0062 (0.053)   custom3 0.0111 (0.097)
      BERT binary logits (mean |x| 0.003): mean |Δ| 0.0004 .. 0.0008
  two independently initialised models of the same config differ by mean |Δ| 0.090 .. 0.126, so
  the tied deviation is 0.07 .. 0.27 of an unrelated model's.
"""

import pytest
import torch

from mlmega.operators import decoalesce
from tests.helpers import TIED, UNTIED, forward_logits, init_model_state, make_model_state, \
    token_ids, variant
from tests.operators.schemes import SCHEMES, WIDTH

pytestmark = pytest.mark.usefixtures("model_parallel")


def _inputs(cfg):
    ids = token_ids(batch=2, seed=11)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, -4:] = False  # BERT: the second sequence ends in padding
    return ids, mask


def _outputs_before_after(cfg, state, scheme):
    large, large_cfg = decoalesce(state, cfg, SCHEMES[scheme])
    ids, mask = _inputs(cfg)
    return forward_logits(cfg, state, ids, mask), forward_logits(large_cfg, large, ids, mask)


@pytest.mark.parametrize("scheme", WIDTH)
@pytest.mark.parametrize("name", UNTIED)
def test_untied_width_decoalescing_preserves_logits(name, scheme):
    cfg = variant(name)
    before, after = _outputs_before_after(cfg, make_model_state(cfg, seed=7), scheme)
    assert len(before) == len(after) == (2 if cfg.bert_binary_head else 1)
    assert before[0].shape == after[0].shape == (2, 16, 128)
    assert before[0].std() > 0.3  # logits are far from trivial
    for small_out, large_out in zip(before, after):  # float32 rounding only (measured <= 6e-6)
        error, scale = (small_out - large_out).abs().max().item(), small_out.abs().max().item()
        assert error < 1e-5 * max(1.0, scale), f"max |Δ| {error:.2e} at logit scale {scale:.2f}"


@pytest.mark.parametrize("scheme", WIDTH)
@pytest.mark.parametrize("name", TIED)
def test_tied_width_decoalescing_keeps_logits_close(name, scheme):
    cfg = variant(name)
    state = init_model_state(cfg, seed=7)
    before, after = _outputs_before_after(cfg, state, scheme)
    ids, mask = _inputs(cfg)
    unrelated = forward_logits(cfg, init_model_state(cfg, seed=107), ids, mask)
    assert all(torch.isfinite(out).all() for out in after)
    deviation = (before[0] - after[0]).abs().mean().item()
    assert 0 < deviation < 0.06  # measured 0.006 .. 0.034 (see module docstring)
    # much closer than an unrelated model of the same config (measured ratio 0.07 .. 0.27)
    assert deviation < 0.4 * (before[0] - unrelated[0]).abs().mean().item()
    if cfg.bert_binary_head:
        assert (before[1] - after[1]).abs().mean() < 5e-3  # measured <= 8e-4


@pytest.mark.parametrize("name", TIED)
def test_preserve_function_makes_tied_decoalescing_exact(name, model_parallel):
    """With preserve_function the residual writers (proj, fc2) take the embeddings' 1/g too, so the
    whole residual stream is scaled alike and pre-LN layers see the same normalised inputs: the
    logits change only through the norms' epsilon (with eps=1e-5 on these randomised models:
    mean |Δ| 3e-5-5e-4 vs 0.05-0.2 with the paper's rule). With eps=1e-12, to float rounding."""
    from mlmega.operators import LevelSchemes, coalesce, decoalesce
    from tests.helpers import forward_logits, make_model_state, token_ids, variant

    small = variant(name).replace(norm_epsilon=1e-12)
    state = make_model_state(small, seed=3)
    width = LevelSchemes.from_factors(width_factor=2).width
    ids = token_ids()
    reference = forward_logits(small, state, ids)[0]
    deviation = {}
    for preserve in (False, True):
        schemes = LevelSchemes(width=width, preserve_function=preserve)
        large_state, large = decoalesce(state, small, schemes)
        deviation[preserve] = (forward_logits(large, large_state, ids)[0] - reference).abs().mean()
        back, _ = coalesce(large_state, large, schemes)
        assert all(torch.equal(back[k], state[k]) for k in state)
    assert deviation[True] < 1e-5 and deviation[False] > 1e-2


@pytest.mark.parametrize("scheme", ["both-preserving", "depth3-preserving"])
@pytest.mark.parametrize("name", ["gpt-mha-gelu-tied-abs-ln-bias",
                                  "gpt-gqa-swiglu-untied-rope-rms-nobias", "bert-tied-binary"])
def test_preserve_function_makes_depth_decoalescing_exact(name, scheme):
    """Depth with preserve_function: each group's first layer is the small layer and the other
    copies are identity blocks (residual writers zero), so a pre-LN model computes the same logits
    (measured max |Δ| <= 3e-6 at eps 1e-12); plain copying changes them (mean |Δ| > 0.1)."""
    small = variant(name).replace(norm_epsilon=1e-12)
    state = make_model_state(small, seed=5)
    ids, mask = _inputs(small)
    reference = forward_logits(small, state, ids, mask)
    large_state, large = decoalesce(state, small, SCHEMES[scheme])
    assert large.num_layers > small.num_layers
    for before, after in zip(reference, forward_logits(large, large_state, ids, mask)):
        error, scale = (before - after).abs().max().item(), before.abs().max().item()
        assert error < 1e-5 * max(1.0, scale), f"max |Δ| {error:.2e} at logit scale {scale:.2f}"
    copied, _ = decoalesce(state, small, SCHEMES["depth-adjacent"])
    plain = forward_logits(small.replace(num_layers=4), copied, ids, mask)[0]
    assert (plain - reference[0]).abs().mean() > 0.1
