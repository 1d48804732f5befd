"""Bad input raises ConfigError naming the problem, before any tensor is touched.

Operator calls get an empty state dict: the scheme/config error must come first (checking the
state dict would otherwise report missing parameters).
"""

import pytest

from mlmega.config.errors import ConfigError
from mlmega.operators import LevelSchemes, SchemeSpec, coalesce, decoalesce, interpolate
from tests.helpers import make_model_state, variant


def _width(groups):
    return LevelSchemes.from_dict({"width": groups}, "test.yaml")


MHA4 = variant("gpt-mha-gelu-tied-abs-ln-bias", units=4, layers=4)
GQA4 = variant("gpt-gqa-gelu-untied-rope-ln-bias", units=4, layers=4)  # 8 heads, 4 query groups


@pytest.mark.parametrize("schemes,cfg,message", [
    (_width([[0, 1], [1, 2], [3]]), MHA4, r"index 1 appears in groups 0 and 1"),
    (_width([[0, 1], [2, 7]]), MHA4,
     r"group 1 names num_attention_heads index 7, out of range \[0, 4\)"),
    (_width([[0, 1], [2]]), MHA4, r"covers 3 of 4 num_attention_heads; missing indices \[3\]"),
    (_width([[0, 1], [2]]), GQA4, r"covers 3 of 4 num_query_groups"),
    (LevelSchemes.from_factors(width_factor=3), MHA4,
     r"num_attention_heads=4 is not divisible by the stacked factor 3"),
    (LevelSchemes.from_factors(width_factor=8, width_kind="adjacent"), GQA4,
     r"num_query_groups=4 is not divisible by the adjacent factor 8"),
    (LevelSchemes.from_factors(depth_factor=3), MHA4,
     r"num_layers=4 is not divisible by the adjacent factor 3"),
    (LevelSchemes.from_dict({"depth": [[0, 1], [2, 2, 3]]}, "d"), MHA4,
     r"num_layers index 2 appears"),
    (LevelSchemes.from_factors(width_factor=2), MHA4.replace(ffn_hidden_size=50),
     r"ffn_hidden_size=50 is not divisible by the 4 width units"),
], ids=["repeated", "out-of-range", "missing", "missing-gqa", "factor-heads", "factor-groups",
        "factor-layers", "depth-repeated", "ffn-units"])
def test_coalesce_rejects_bad_schemes(schemes, cfg, message):
    with pytest.raises(ConfigError, match=message):
        coalesce({}, cfg, schemes)


def test_decoalesce_rejects_a_scheme_with_the_wrong_group_count():
    """Three groups over 4 heads cannot de-coalesce a 2-head model."""
    small = variant("gpt-mha-gelu-untied-abs-ln-bias", units=2)
    with pytest.raises(ConfigError, match=r"the scheme has 3 groups but the small model has "
                                          r"num_attention_heads=2"):
        decoalesce({}, small, _width([[0, 1], [2], [3]]))
    with pytest.raises(ConfigError, match=r"3 groups but the small model has num_layers=2"):
        decoalesce({}, small, LevelSchemes.from_dict({"depth": [[0], [1], [2]]}, "d"))


@pytest.mark.usefixtures("model_parallel")
def test_operators_reject_a_state_dict_of_another_config():
    small, large = variant("bert-untied-binary", 2), variant("bert-untied-binary", 4)
    schemes = LevelSchemes.from_factors(width_factor=2)
    with pytest.raises(ConfigError, match=r"coalesce input: .* has shape \(\d+, 16\), expected "
                                          r"\(\d+, 32\)"):
        coalesce(make_model_state(small, 0), large, schemes)
    with pytest.raises(ConfigError, match=r"de-coalesce input does not match .* missing "
                                          r"\['embedding.position_embeddings.weight'"):
        state = make_model_state(small, 0)
        del state["embedding.position_embeddings.weight"]
        decoalesce(state, small, schemes)


@pytest.mark.usefixtures("model_parallel")
def test_interpolate_rejects_mismatched_inputs_and_alpha():
    small, large = variant("gpt-mha-gelu-untied-abs-ln-bias", 2), \
        variant("gpt-mha-gelu-untied-abs-ln-bias", 4)
    big, tiny = make_model_state(large, 0), make_model_state(small, 0)
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"alpha=.*expected a number in \[0, 1\]"):
            interpolate(big, big, large, alpha)
    with pytest.raises(ConfigError, match=r"de-coalesced model: .* has shape"):
        interpolate(big, tiny, large, 0.5)
    with pytest.raises(ConfigError, match=r"large model: .* has shape"):
        interpolate(tiny, big, large, 0.5)
    extra = dict(big, **{"decoder.layers.9.mlp.linear_fc1.weight": big[
        "decoder.layers.0.mlp.linear_fc1.weight"]})
    with pytest.raises(ConfigError,
                       match=r"unexpected \['decoder.layers.9.mlp.linear_fc1.weight'\]"):
        interpolate(big, extra, large, 0.5)
    with pytest.raises(ConfigError, match=r"does not match"):  # right state, wrong config
        interpolate(big, big, large.replace(num_layers=3), 0.5)


@pytest.mark.parametrize("data,message", [
    ({"width": {"kind": "stacked", "factor": 2}, "widht": 2}, r"unknown key\(s\) \['widht'\]"),
    ({"width": {"kind": "stacked", "factr": 2}}, r"width: unknown key\(s\) \['factr'\]"),
    ({"width": {"kind": "interleaved"}}, r"kind='interleaved': expected one of"),
    ({"depth": {"kind": "adjacent", "factor": 1}}, r"factor=1: expected an integer >= 2"),
    ({"depth": {"kind": "adjacent", "factor": True}}, r"factor=True"),
    ({"width": [[0, 1], ["2", 3]]}, r"group member '2' is not an integer"),
    ({"width": [[0, 1], []]}, r"groups must be a non-empty list of non-empty lists"),
    ({"width": 3}, r"expected a mapping \{kind, factor\} or a list of groups, got 3"),
    ({}, r"needs a width scheme, a depth scheme, or both"),
    ([[0, 1]], r"expected a mapping with width and/or depth schemes"),
    ({"width_scheme": [[0, 1]], "reserved_heads": [3]},
     r"reserved_heads=\[3\] is not supported; expected an empty list"),
    ({"width_scheme": [[0, 1]], "reserved_layers": [0, 1]},
     r"reserved_layers=\[0, 1\] is not supported"),
    ({"width_scheme": [[0, 1]], "width": {"kind": "stacked"}}, r"unknown key\(s\) \['width'\]"),
], ids=["top-key", "scheme-key", "kind", "factor-1", "factor-bool", "member-str", "empty-group",
        "scalar", "empty", "not-mapping", "reserved-heads", "reserved-layers", "mixed-formats"])
def test_scheme_parsing_rejects_bad_input(data, message):
    with pytest.raises(ConfigError, match=message):
        LevelSchemes.from_dict(data, "schemes.yaml")


def test_scheme_errors_name_their_source():
    with pytest.raises(ConfigError, match=r"^level2\.yaml: width: kind="):
        LevelSchemes.from_dict({"width": {"kind": "nope"}}, "level2.yaml")
    with pytest.raises(ConfigError, match=r"^--depth-factor: factor=0"):
        SchemeSpec.parse({"kind": "adjacent", "factor": 0}, "--depth-factor")


def test_unequal_width_groups_are_refused():
    """Width groups must be of one size (unequal ones would weight LayerNorm statistics)."""
    from mlmega.config.errors import ConfigError
    from mlmega.config.model import ModelConfig
    from mlmega.operators import LevelMap, LevelSchemes

    cfg = ModelConfig(arch="gpt", num_layers=2, hidden_size=32, num_attention_heads=4,
                      vocab_size=100, max_sequence_length=16)
    schemes = LevelSchemes.from_dict({"width": [[0, 1, 2], [3]]}, "test")
    with pytest.raises(ConfigError, match=r"width scheme groups have sizes \[1, 3\]"):
        LevelMap.from_large(cfg, schemes)
