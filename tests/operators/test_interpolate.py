"""Invariant 6: θ = (1 - α) θ_large + α D(θ_small); exact at α = 0 and α = 1."""

import pytest
import torch

from mlmega.operators import decoalesce, interpolate, interpolate_tensor
from tests.helpers import make_model_state, variant
from tests.operators.schemes import SCHEMES

pytestmark = pytest.mark.usefixtures("model_parallel")


@pytest.fixture(scope="module", params=["gpt-gqa-swiglu-tied-rope-rms-bias", "bert-untied-binary"])
def pair(request, model_parallel):
    """(large state, de-coalesced state, large config) of a 2 -> 4 unit, 2 -> 4 layer level."""
    small_cfg = variant(request.param)
    decoalesced, cfg = decoalesce(make_model_state(small_cfg, 8), small_cfg,
                                  SCHEMES["both-stacked-adjacent"])
    return make_model_state(cfg, 9), decoalesced, cfg


def test_alpha_zero_and_one_are_exact(pair):
    large, decoalesced, cfg = pair
    at0, at1 = interpolate(large, decoalesced, cfg, 0.0), interpolate(large, decoalesced, cfg, 1.0)
    assert at0.keys() == at1.keys() == large.keys()
    for key in large:
        assert torch.equal(at0[key], large[key]), key
        assert torch.equal(at1[key], decoalesced[key]), key


@pytest.mark.parametrize("alpha", [0.5, 0.25])
def test_interpolation_is_the_weighted_mean(pair, alpha):
    large, decoalesced, cfg = pair
    mixed = interpolate(large, decoalesced, cfg, alpha)
    for key in large:
        expected = (1 - alpha) * large[key].double() + alpha * decoalesced[key].double()
        assert mixed[key].dtype == large[key].dtype
        # float32 rounding (torch.lerp: a difference, a product and a sum, each rounded once)
        bound = 2 * torch.finfo(torch.float32).eps * (large[key].abs() + decoalesced[key].abs())
        assert ((mixed[key].double() - expected).abs() <= bound).all(), key
    if alpha == 0.5:
        key = "embedding.word_embeddings.weight"
        torch.testing.assert_close(mixed[key], (large[key] + decoalesced[key]) / 2)


def test_interpolation_breaks_partner_symmetry(pair):
    """De-coalesced partner heads are identical; mixing in the large model makes them differ."""
    large, decoalesced, cfg = pair
    layer = "decoder" if cfg.arch == "gpt" else "encoder"
    key = f"{layer}.layers.0.self_attention.linear_qkv.weight"
    units = cfg.num_query_groups  # stacked: unit i pairs with i + units / 2
    blocks = lambda t: t.reshape(units, -1, t.shape[-1])  # noqa: E731
    assert torch.equal(blocks(decoalesced[key])[0], blocks(decoalesced[key])[units // 2])
    mixed = blocks(interpolate(large, decoalesced, cfg, 0.5)[key])
    assert (mixed[0] - mixed[units // 2]).abs().max() > 1e-2


def test_interpolate_tensor_is_exact_at_the_ends_in_bf16():
    a = torch.randn(64, generator=torch.Generator().manual_seed(0)).bfloat16()
    b = torch.randn(64, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert torch.equal(interpolate_tensor(a, b, 0.0), a)
    assert torch.equal(interpolate_tensor(a, b, 1.0), b)
    assert interpolate_tensor(a, b, 0.5).dtype == torch.bfloat16
