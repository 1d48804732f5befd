"""The parameter table matches real megatron-core models: names, shapes, TP split dims, counts."""

import pytest
import torch

from mlmega.config.errors import ConfigError
from mlmega.models.build import build_model
from mlmega.models.params import iter_params, num_parameters, param_shapes
from mlmega.models.state import check_state_dict, full_state_dict
from tests.helpers import VARIANTS, variant

pytestmark = pytest.mark.usefixtures("model_parallel")

CONFIGS = {name: variant(name, units=4, layers=3) for name in VARIANTS}
CONFIGS["gpt-gqa-one-group"] = variant("gpt-gqa-gelu-untied-rope-ln-bias", units=1)
CONFIGS["bert-no-tokentypes"] = variant("bert-tied-nobinary").replace(num_tokentypes=0)
CONFIGS["bert-rope-binary"] = variant("bert-tied-binary").replace(position_embedding="rope")
CONFIGS["gpt-vocab-divisible-1"] = variant("gpt-mha-gelu-tied-abs-ln-bias").replace(
    make_vocab_size_divisible_by=1)


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_table_matches_the_real_model(cfg):
    model = build_model(cfg)
    state = full_state_dict(model)
    assert {k: tuple(v.shape) for k, v in state.items()} == param_shapes(cfg)
    check_state_dict(state, cfg)
    # the TP split dim recorded in the table is the one megatron-core marks on the parameter
    specs = {name: spec for name, spec, _ in iter_params(cfg)}
    for name, param in model.named_parameters():
        split = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        assert specs[name].tp_dim == split, name
    # parameter count: the model's numel minus the vocab padding rows
    padded = cfg.padded_vocab_size()
    padding = sum(v.numel() // padded * (padded - cfg.vocab_size)
                  for k, v in state.items() if specs[k].dims[0] == "vocab")
    assert num_parameters(cfg) == sum(v.numel() for v in state.values()) - padding


def test_table_sizes_for_a_gqa_swiglu_model():
    """Hand-computed shapes: 8 heads of 8 in 4 groups, SwiGLU FFN 48, padded vocab 128."""
    cfg = CONFIGS["gpt-gqa-swiglu-untied-rope-rms-nobias"]
    shapes = param_shapes(cfg)
    assert shapes["decoder.layers.2.self_attention.linear_qkv.weight"] == (4 * (2 + 2) * 8, 64)
    assert shapes["decoder.layers.2.self_attention.linear_proj.weight"] == (64, 64)
    assert shapes["decoder.layers.0.mlp.linear_fc1.weight"] == (2 * 48, 64)
    assert shapes["decoder.layers.0.mlp.linear_fc2.weight"] == (64, 48)
    assert shapes["output_layer.weight"] == shapes["embedding.word_embeddings.weight"] == (128, 64)
    assert "embedding.position_embeddings.weight" not in shapes  # RoPE
    assert len(shapes) == 1 + 3 * 6 + 1 + 1


def test_check_state_dict_names_the_problem():
    cfg = CONFIGS["bert-untied-binary"]
    state = full_state_dict(build_model(cfg))
    bad = dict(state, **{"lm_head.dense.weight": torch.zeros(3, 3)})
    with pytest.raises(ConfigError, match=r"lm_head\.dense\.weight has shape \(3, 3\), expected "
                                          r"\(32, 32\)"):
        check_state_dict(bad, cfg)
    missing = {k: v for k, v in state.items() if k != "pooler.dense.bias"}
    with pytest.raises(ConfigError, match=r"missing \['pooler\.dense\.bias'\]"):
        check_state_dict(missing, cfg)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_bf16_model_has_only_bf16_parameters(arch, model_parallel):
    """Norms and position embeddings too: a mixed model fails at its first matmul on GPU."""
    import torch

    from mlmega.config.model import ModelConfig
    from mlmega.models.build import build_model

    cfg = ModelConfig(arch=arch, num_layers=2, hidden_size=32, num_attention_heads=4,
                      vocab_size=100, max_sequence_length=16)
    model = build_model(cfg, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
