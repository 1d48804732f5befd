"""Scheme files: mlmega YAML and the reference implementation's JSON (tmp_path)."""

import json

import pytest

from mlmega.config.errors import ConfigError
from mlmega.operators import LevelMap, LevelSchemes, SchemeSpec
from tests.helpers import variant


def test_yaml_scheme_file(tmp_path):
    path = tmp_path / "level.yaml"
    path.write_text("width: {kind: adjacent, factor: 2}\ndepth: [[0, 1], [2, 3]]\n")
    schemes = LevelSchemes.load(path)
    assert (schemes.width.kind, schemes.width.factor) == ("adjacent", 2)
    assert schemes.depth.kind == "custom" and schemes.depth.groups == ((0, 1), (2, 3))
    assert str(path) in schemes.width.source
    level = LevelMap.from_large(variant("gpt-mha-gelu-tied-abs-ln-bias", 4, 4), schemes)
    assert level.width.groups == ((0, 1), (2, 3))
    assert (level.small.num_attention_heads, level.small.num_layers) == (2, 2)


def test_reference_json_scheme_file(tmp_path):
    """The reference's 12-layer, 12-head config pairs head/layer i with i + 6 (= stacked)."""
    data = {"width_scheme": [[i, i + 6] for i in range(6)],
            "depth_scheme": [[i, i + 6] for i in range(6)],
            "reserved_heads": [], "reserved_layers": []}
    path = tmp_path / "scheme.json"
    path.write_text(json.dumps(data))
    schemes = LevelSchemes.load(path)
    stacked = SchemeSpec("stacked", 2).resolve(12, "heads")
    assert schemes.width.resolve(12, "heads") == stacked
    assert schemes.depth.resolve(12, "num_layers") == stacked
    assert schemes.width.resolve_from_small(6, "heads") == stacked


@pytest.mark.parametrize("name,text,message", [
    ("bad.yaml", "width: [[0, 1]\n", r"bad\.yaml: cannot read scheme file"),
    ("bad.json", '{"width_scheme": [[0, 6]],}', r"bad\.json: cannot read scheme file"),
    ("reserved.json", '{"width_scheme": [[0, 1]], "reserved_heads": [2]}',
     r"reserved\.json: reserved_heads=\[2\] is not supported"),
    ("typo.yaml", "width: stacked\ndepht: adjacent\n", r"typo\.yaml: unknown key\(s\) \['depht'\]"),
], ids=["yaml-syntax", "json-syntax", "json-reserved", "yaml-typo"])
def test_bad_scheme_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        LevelSchemes.load(path)


def test_missing_scheme_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read scheme file"):
        LevelSchemes.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("data", [
    {"width": {"kind": "stacked", "factor": 2}},
    {"depth": {"groups": [[0, 3], [1, 2]]}, "preserve_function": True},
    {"width": {"kind": "adjacent", "factor": 3}, "depth": {"kind": "stacked", "factor": 2}},
])
def test_schemes_round_trip_through_their_dict(data):
    schemes = LevelSchemes.from_dict(data, "x")
    assert schemes.to_dict() == data
    assert LevelSchemes.from_dict(schemes.to_dict(), "y") == schemes
