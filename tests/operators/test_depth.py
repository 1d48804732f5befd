"""Depth operators: de-coalescing copies layers (adjacent interleaves, stacked repeats), coalescing
averages each group, width and depth commute. Plain depth de-coalescing does not preserve the
function (invariant 5); with preserve_function it does (test_preservation.py)."""

import pytest
import torch

from mlmega.operators import LevelSchemes, coalesce, decoalesce
from tests.helpers import make_model_state, variant

pytestmark = pytest.mark.usefixtures("model_parallel")

NAMES = ["gpt-gqa-swiglu-untied-rope-rms-nobias", "bert-tied-binary"]


def _layer_params(state, layer):
    marker = f"layers.{layer}."
    return {k.replace(marker, "layers.#."): v for k, v in state.items() if marker in k}


def _global_params(state):
    return {k: v for k, v in state.items() if ".layers." not in k}


@pytest.mark.parametrize("kind,sources", [("adjacent", [0, 0, 1, 1, 2, 2]),
                                          ("stacked", [0, 1, 2, 0, 1, 2])],
                         ids=["adjacent", "stacked"])
@pytest.mark.parametrize("name", NAMES)
def test_depth_decoalescing_copies_layers(name, kind, sources):
    small_cfg = variant(name, layers=3)
    small = make_model_state(small_cfg, seed=2)
    large, large_cfg = decoalesce(small, small_cfg, LevelSchemes.from_factors(
        depth_factor=2, depth_kind=kind))
    assert large_cfg == small_cfg.replace(num_layers=6)
    for layer, source in enumerate(sources):
        expected, got = _layer_params(small, source), _layer_params(large, layer)
        assert expected.keys() == got.keys() and len(got) >= 6
        assert all(torch.equal(got[k], expected[k]) for k in got), (layer, source)
    small_globals = _global_params(small)
    assert all(torch.equal(v, small_globals[k]) for k, v in _global_params(large).items())


@pytest.mark.parametrize("scheme,groups", [
    (LevelSchemes.from_factors(depth_factor=2, depth_kind="adjacent"), [[0, 1], [2, 3]]),
    (LevelSchemes.from_factors(depth_factor=2, depth_kind="stacked"), [[0, 2], [1, 3]]),
    (LevelSchemes.from_dict({"depth": [[3, 0, 1], [2]]}, "custom"), [[3, 0, 1], [2]]),
], ids=["adjacent", "stacked", "custom-unequal"])
@pytest.mark.parametrize("name", NAMES)
def test_depth_coalescing_averages_groups(name, scheme, groups):
    large_cfg = variant(name, layers=4)
    large = make_model_state(large_cfg, seed=3)
    small, small_cfg = coalesce(large, large_cfg, scheme)
    assert small_cfg == large_cfg.replace(num_layers=2)
    for layer, group in enumerate(groups):
        got = _layer_params(small, layer)
        members = [_layer_params(large, j) for j in group]
        for key, value in got.items():
            mean = sum(m[key].double() for m in members) / len(group)
            torch.testing.assert_close(value, mean.float(), rtol=1e-6, atol=1e-7, msg=key)
    large_globals = _global_params(large)
    assert all(torch.equal(v, large_globals[k]) for k, v in _global_params(small).items())


@pytest.mark.parametrize("name", NAMES)
def test_width_and_depth_commute(name):
    """Combined coalescing equals width-then-depth and depth-then-width applied separately."""
    cfg = variant(name, units=4, layers=4)
    state = make_model_state(cfg, seed=4)
    width = LevelSchemes.from_factors(width_factor=2, width_kind="stacked")
    depth = LevelSchemes.from_factors(depth_factor=2, depth_kind="stacked")
    both, both_cfg = coalesce(state, cfg, LevelSchemes(width.width, depth.depth))
    w_then_d, cfg1 = coalesce(*coalesce(state, cfg, width), depth)
    d_then_w, cfg2 = coalesce(*coalesce(state, cfg, depth), width)
    assert both_cfg == cfg1 == cfg2 == variant(name, units=2, layers=2)
    for key in both:
        torch.testing.assert_close(w_then_d[key], both[key], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(d_then_w[key], both[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_preserve_function_sums_residual_writers_over_a_group(name):
    """preserve_function: coalescing sums attention proj / fc2 over a depth group (averages the
    rest); de-coalescing gives them to the group's first layer and zeros to the other copies."""
    large_cfg = variant(name, layers=4)
    large = make_model_state(large_cfg, seed=6)
    schemes = LevelSchemes.from_dict({"depth": [[0, 3], [1, 2]], "preserve_function": True}, "p")
    small, small_cfg = coalesce(large, large_cfg, schemes)
    writers = ("linear_proj.weight", "linear_fc2.weight")
    for layer, group in enumerate([[0, 3], [1, 2]]):
        got, members = _layer_params(small, layer), [_layer_params(large, j) for j in group]
        for key, value in got.items():
            total = sum(m[key].double() for m in members)
            expected = total if key.endswith(writers) or "linear_proj.bias" in key or \
                "linear_fc2.bias" in key else total / len(group)
            torch.testing.assert_close(value, expected.float(), rtol=1e-6, atol=1e-7, msg=key)
    back, _ = decoalesce(small, small_cfg, schemes)
    for layer, (source, first) in enumerate([(0, True), (1, True), (1, False), (0, False)]):
        for key, value in _layer_params(back, layer).items():
            expected = _layer_params(small, source)[key]
            if not first and (key.endswith(writers) or key.endswith(("linear_proj.bias",
                                                                      "linear_fc2.bias"))):
                expected = torch.zeros_like(expected)
            assert torch.equal(value, expected), (layer, key)
