"""The copies' spread: 0 for a de-coalesced model, that of a random one for a random model, and
growing as interpolation mixes in more of the large model's own weights."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.spread import copies_spread
from mlmega.config.schemes import LevelSchemes
from mlmega.operators.level_map import decoalesce, interpolate
from tests.helpers import make_model_state, variant

pytestmark = pytest.mark.usefixtures("model_parallel")

SCHEMES = LevelSchemes.from_factors(width_factor=2, depth_factor=2, width_kind="stacked",
                                    depth_kind="adjacent")


@pytest.mark.parametrize("name", ["gpt-mha-gelu-tied-abs-ln-bias", "bert-untied-binary"])
@pytest.mark.parametrize("preserve", [False, True])
def test_spread_is_zero_for_copies_and_that_of_noise_for_a_random_model(name, preserve):
    schemes = dataclasses.replace(SCHEMES, preserve_function=preserve)
    small = variant(name, units=2, layers=1)
    large_state, large = decoalesce(make_model_state(small, seed=1), small, schemes)
    assert copies_spread(large_state, large, schemes) < 1e-6
    # a random large model: its layers' matrices are grouped along both dimensions, so D(C(W))
    # keeps a quarter of their energy and sqrt(3/4) of their norm lies outside
    random = copies_spread(make_model_state(large, seed=2), large, schemes)
    assert random == pytest.approx(0.75 ** 0.5, abs=0.01)


def test_spread_grows_as_interpolation_takes_more_of_the_large_model():
    small = variant("gpt-mha-gelu-tied-abs-ln-bias", units=2, layers=1)
    copies, large = decoalesce(make_model_state(small, seed=1), small, SCHEMES)
    own = make_model_state(large, seed=3)
    spreads = [copies_spread(interpolate(own, copies, large, alpha), large, SCHEMES)
               for alpha in (1.0, 0.9, 0.5, 0.0)]
    assert spreads == sorted(spreads) and spreads[0] < 1e-6 < spreads[1]
