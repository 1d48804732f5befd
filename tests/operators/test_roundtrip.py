"""Invariants 2 and 7: coalesce(decoalesce(θ)) == θ; shapes match the returned config; vocab kept."""

import pytest
import torch

from mlmega.models.build import build_model
from mlmega.models.params import param_shapes
from mlmega.models.state import full_state_dict, load_full_state_dict
from mlmega.operators import coalesce, decoalesce
from tests.helpers import VARIANTS, make_model_state, variant
from tests.operators.schemes import SCALE, SCHEMES

pytestmark = pytest.mark.usefixtures("model_parallel")

# every variant with the core schemes, plus the custom groupings on a GQA and a BERT variant
CASES = [(v, s) for v in VARIANTS for s in ("width-stacked", "width-adjacent", "depth-adjacent",
                                            "both-stacked-adjacent", "both-preserving")]
CASES += [(v, s) for v in ("gpt-gqa-swiglu-untied-rope-rms-nobias", "bert-tied-binary",
                           "gpt-mha-gelu-tied-abs-ln-bias")
          for s in ("width-custom3", "width-custom4", "depth-stacked", "depth-custom3",
                    "both-adjacent-stacked", "depth3-preserving")]


@pytest.mark.parametrize("name,scheme", CASES, ids=[f"{v}-{s}" for v, s in CASES])
def test_coalesce_undoes_decoalesce(name, scheme):
    small_cfg = variant(name)
    small = make_model_state(small_cfg, seed=1)
    large, large_cfg = decoalesce(small, small_cfg, SCHEMES[scheme])
    back, back_cfg = coalesce(large, large_cfg, SCHEMES[scheme])
    assert back_cfg == small_cfg
    assert back.keys() == small.keys()
    for key in small:
        assert back[key].dtype == small[key].dtype
        torch.testing.assert_close(back[key], small[key], rtol=1e-6, atol=1e-7, msg=key)


def _assert_fits(state, cfg):
    """Shapes equal the table's for cfg, and a real megatron-core model of cfg loads the state."""
    assert {k: tuple(v.shape) for k, v in state.items()} == param_shapes(cfg)
    model = build_model(cfg)
    load_full_state_dict(model, state)
    loaded = full_state_dict(model)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


SHAPE_CASES = [(v, s) for v in VARIANTS for s in ("both-stacked-adjacent",)]
SHAPE_CASES += [(v, "width-custom3") for v in ("gpt-gqa-gelu-untied-rope-ln-bias",
                                               "bert-untied-binary")]


@pytest.mark.parametrize("name,scheme", SHAPE_CASES, ids=[f"{v}-{s}" for v, s in SHAPE_CASES])
def test_decoalesced_and_coalesced_states_fit_their_configs(name, scheme):
    wide, deep = SCALE[scheme]
    small_cfg, large_cfg_expected = variant(name, 2, 2), variant(name, 2 * wide, 2 * deep)

    large, large_cfg = decoalesce(make_model_state(small_cfg, 3), small_cfg, SCHEMES[scheme])
    assert large_cfg == large_cfg_expected
    assert large_cfg.head_dim == small_cfg.head_dim
    assert large_cfg.heads_per_group == small_cfg.heads_per_group
    _assert_fits(large, large_cfg)

    large_state = make_model_state(large_cfg_expected, 4)
    small, small_back = coalesce(large_state, large_cfg_expected, SCHEMES[scheme])
    assert small_back == small_cfg
    _assert_fits(small, small_cfg)

    # vocabulary untouched: same vocab size, same padded rows, vocab-sized biases copied
    for cfg in (large_cfg, small_back):
        assert cfg.vocab_size == small_cfg.vocab_size
        assert cfg.padded_vocab_size() == 128
    assert large["embedding.word_embeddings.weight"].shape[0] == 128
    assert small["embedding.word_embeddings.weight"].shape[0] == 128
    if "output_layer.bias" in small:
        assert torch.equal(small["output_layer.bias"], large_state["output_layer.bias"])
