"""ModelConfig: validation, YAML and Megatron-args round trips, padded vocabulary."""

import argparse
import math

import pytest
import yaml

from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig

BASE = dict(arch="gpt", num_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=100,
            max_sequence_length=32)
# every field away from its default, so a round trip that drops one is caught
CUSTOM_GPT = ModelConfig(**BASE, num_query_groups=2, ffn_hidden_size=96,
                         make_vocab_size_divisible_by=64, position_embedding="rope",
                         rotary_base=500000, normalization="RMSNorm", norm_epsilon=1e-6,
                         activation="swiglu", tie_embeddings=False, add_bias_linear=False,
                         hidden_dropout=0.1, attention_dropout=0.05, init_method_std=0.01)
BERT_BINARY = ModelConfig(**dict(BASE, arch="bert"), bert_binary_head=True, tie_embeddings=False)
BERT_PLAIN = ModelConfig(**dict(BASE, arch="bert"), num_tokentypes=0)
CONFIGS = {"gpt-default": ModelConfig(**BASE), "gpt-custom": CUSTOM_GPT,
           "bert-binary": BERT_BINARY, "bert-no-tokentypes": BERT_PLAIN,
           "bert-default": ModelConfig(**dict(BASE, arch="bert"))}


def test_defaults_and_derived_sizes():
    cfg = ModelConfig(**BASE)
    assert (cfg.num_query_groups, cfg.ffn_hidden_size) == (8, 256)
    assert (cfg.head_dim, cfg.heads_per_group, cfg.gated) == (8, 1, False)
    assert (CUSTOM_GPT.head_dim, CUSTOM_GPT.heads_per_group, CUSTOM_GPT.gated) == (8, 4, True)


@pytest.mark.parametrize("vocab,divisible,tp,expected", [
    (100, 128, 1, 128), (128, 128, 1, 128), (129, 128, 1, 256), (50257, 128, 1, 50304),
    (50257, 128, 2, 50432), (50257, 128, 8, 51200), (30522, 128, 4, 30720), (100, 64, 1, 128),
    (100, 1, 1, 100),
])
def test_padded_vocab_size(vocab, divisible, tp, expected):
    cfg = ModelConfig(**dict(BASE, vocab_size=vocab), make_vocab_size_divisible_by=divisible)
    assert cfg.padded_vocab_size(tp) == expected
    assert expected == math.ceil(vocab / (divisible * tp)) * divisible * tp


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_yaml_round_trip(tmp_path, cfg):
    nested = tmp_path / "recipe.yaml"
    nested.write_text(yaml.safe_dump({"model": cfg.to_dict(), "train": {"steps": 10}}))
    loaded = ModelConfig.from_yaml(nested)
    assert loaded == cfg and loaded.to_dict() == cfg.to_dict()
    assert loaded.source == str(nested)
    flat = tmp_path / "model.yaml"
    flat.write_text(yaml.safe_dump(cfg.to_dict()))
    assert ModelConfig.from_yaml(flat, key=None) == cfg


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_megatron_args_round_trip(cfg):
    args = argparse.Namespace(**cfg.to_megatron_args())
    assert ModelConfig.from_megatron_args(args) == cfg


def test_megatron_args_values():
    args = CUSTOM_GPT.to_megatron_args()
    assert args["kv_channels"] == 8 and args["group_query_attention"] is True
    assert args["num_query_groups"] == 2 and args["swiglu"] is True
    assert args["untie_embeddings_and_output_weights"] is True
    assert args["max_position_embeddings"] == args["seq_length"] == 32
    assert ModelConfig(**BASE).to_megatron_args()["group_query_attention"] is False


def test_from_plain_megatron_lm_args():
    """Args as Megatron-LM saves them: no mlmega keys, GQA flag off, vocab_size None next to the
    padded size (the true vocabulary is given), Megatron's eps name."""
    args = argparse.Namespace(
        num_layers=12, hidden_size=768, num_attention_heads=12, group_query_attention=False,
        num_query_groups=1, ffn_hidden_size=3072, vocab_size=None, padded_vocab_size=30592,
        max_position_embeddings=512, layernorm_epsilon=1e-12, swiglu=False,
        untie_embeddings_and_output_weights=False, bert_binary_head=False,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=2)
    cfg = ModelConfig.from_megatron_args(args, arch="bert", source="ckpt/args", vocab_size=30522)
    assert (cfg.num_query_groups, cfg.vocab_size, cfg.norm_epsilon) == (12, 30522, 1e-12)
    assert cfg.tie_embeddings and cfg.position_embedding == "learned_absolute"
    assert cfg.num_tokentypes == 0  # pretrain_bert.py: 2 token types only with the binary head
    args.bert_binary_head = True
    assert ModelConfig.from_megatron_args(args, arch="bert", vocab_size=30522).num_tokentypes == 2


def test_megatron_names_written_and_old_names_read():
    """mlmega writes Megatron-LM's layernorm_epsilon (an RMSNorm eps of 1e-6 stays 1e-6) and still
    reads the norm_epsilon its earlier checkpoints hold."""
    cfg = ModelConfig(**{**BASE, "normalization": "RMSNorm", "norm_epsilon": 1e-6})
    args = cfg.to_megatron_args()
    assert args["layernorm_epsilon"] == 1e-6 and "norm_epsilon" not in args
    assert args["transformer_impl"] == "local" and args["apply_query_key_layer_scaling"] is False
    old = dict(args, norm_epsilon=args.pop("layernorm_epsilon"))
    assert ModelConfig.from_megatron_args(argparse.Namespace(**old)).norm_epsilon == 1e-6


@pytest.mark.parametrize("name,value", [("apply_layernorm_1p", True), ("num_experts", 8),
                                        ("rotary_percent", 0.5), ("qk_layernorm", True),
                                        ("add_qkv_bias", False)])
def test_unsupported_megatron_features_are_refused(name, value):
    args = argparse.Namespace(**{**ModelConfig(**BASE).to_megatron_args(), name: value})
    with pytest.raises(ConfigError, match=rf"ckpt: args\.{name}={value!r}: mlmega's models do "
                                          rf"not support it"):
        ModelConfig.from_megatron_args(args, source="ckpt")


def test_megatron_args_errors():
    with pytest.raises(ConfigError, match=r"ckpt: args do not name the architecture"):
        ModelConfig.from_megatron_args(argparse.Namespace(num_layers=2), source="ckpt")
    with pytest.raises(ConfigError, match=r"args\.vocab_size is None \(padded_vocab_size=256\): "
                                          r"the true vocabulary is unknown"):
        ModelConfig.from_megatron_args(argparse.Namespace(num_layers=2, padded_vocab_size=256),
                                       arch="gpt")


@pytest.mark.parametrize("change,message", [
    (dict(arch="t5"), r"model\.arch='t5': expected one of \('gpt', 'bert'\)"),
    (dict(normalization="BatchNorm"), r"model\.normalization='BatchNorm': expected one of"),
    (dict(hidden_size=60), r"model\.hidden_size=60: expected a multiple of num_attention_heads=8"),
    (dict(num_query_groups=3), r"model\.num_query_groups=3: expected a divisor of"),
    (dict(activation="relu"), r"model\.activation='relu'"),
    (dict(position_embedding="alibi"), r"model\.position_embedding='alibi'"),
    (dict(num_layers=0), r"model\.num_layers=0: expected a positive integer"),
    (dict(num_layers=True), r"model\.num_layers=True: expected a positive integer"),
    (dict(vocab_size="100"), r"model\.vocab_size='100': expected a positive integer"),
    (dict(hidden_size=24, position_embedding="rope"),
     r"model\.hidden_size=24: expected an even head dimension \(hidden_size / heads\) for RoPE"),
    (dict(bert_binary_head=True), r"model\.bert_binary_head=True: expected false for arch 'gpt'"),
], ids=["arch-t5", "batchnorm", "hidden-heads", "groups", "activation", "positions", "zero-layers",
        "bool-layers", "str-vocab", "rope-odd", "gpt-binary-head"])
def test_invalid_values(change, message):
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: " + message):
        ModelConfig.from_dict(dict(BASE, **change), source="cfg.yaml")


def test_unknown_missing_and_non_mapping_options():
    with pytest.raises(ConfigError, match=r"cfg\.yaml: unknown model option\(s\) \['hiden_size', "
                                          r"'tied'\]"):
        ModelConfig.from_dict(dict(BASE, hiden_size=64, tied=True), source="cfg.yaml")
    data = dict(BASE)
    del data["vocab_size"]
    with pytest.raises(ConfigError, match=r"missing required option\(s\) \['vocab_size'\]"):
        ModelConfig.from_dict(data)
    with pytest.raises(ConfigError, match=r"model: expected a mapping, got list"):
        ModelConfig.from_dict([1, 2])
    with pytest.raises(ConfigError, match=r"hidden_size=30"):
        ModelConfig(**BASE).replace(hidden_size=30)  # replace re-validates


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {arch: gpt\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: cannot read YAML"):
        ModelConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read YAML"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"model": dict(BASE, num_layer=3)}))
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown model option\(s\) \['num_layer'\]"):
        ModelConfig.from_yaml(typo)
