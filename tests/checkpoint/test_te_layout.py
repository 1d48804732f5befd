"""TransformerEngine parameter names: checkpoints of a TE-spec model (layer norms fused into the
linears after them, ``_extra_state`` entries) are read, written and converted in both formats, and a
level trained with TE hands over to one trained without (local spec) and back.

TE cannot be imported here, so the expected names of a TE model's state dict are written down from
megatron-core 0.16's spec (models/gpt/gpt_layer_specs.py get_gpt_layer_with_transformer_engine_spec,
models/bert/bert_layer_specs.py get_bert_layer_with_transformer_engine_spec): ``linear_qkv`` and
``linear_fc1`` are TELayerNormColumnParallelLinear (weight, bias, layer_norm_weight,
layer_norm_bias, _extra_state), ``linear_proj`` and ``linear_fc2`` TERowParallelLinear (weight,
bias, _extra_state), ``core_attention`` TEDotProductAttention (_extra_state); ``input_layernorm``
and ``pre_mlp_layernorm`` are IdentityOp (no parameters).
"""

from __future__ import annotations

import pytest
import torch

from mlmega.checkpoint.convert import run_conversion
from mlmega.checkpoint.convert_plan import plan_conversion
from mlmega.checkpoint.formats import load_full_state, save_full_state
from mlmega.checkpoint.dist_format import DistCheckpoint
from mlmega.checkpoint.layout import ShardLayout
from mlmega.checkpoint.torch_format import TorchCheckpoint
from mlmega.models.build import build_model
from mlmega.models.naming import impl_name, local_name
from mlmega.models.params import iter_params
from mlmega.models.state import load_full_state_dict
from mlmega.operators import LevelSchemes
from tests.checkpoint.test_dist_format import random_state
from tests.helpers import variant

TE = "transformer_engine"
TE_LAYER_KEYS = (  # after "<block>.layers.<i>.", for a LayerNorm model with linear biases
    "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.layer_norm_bias",
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
    "self_attention.linear_qkv._extra_state", "self_attention.core_attention._extra_state",
    "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
    "self_attention.linear_proj._extra_state",
    "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.layer_norm_bias",
    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc1._extra_state",
    "mlp.linear_fc2.weight", "mlp.linear_fc2.bias", "mlp.linear_fc2._extra_state")
GPT = "gpt-mha-gelu-untied-abs-ln-bias"


def te_layer_keys(block: str, layers: range) -> set[str]:
    return {f"{block}.layers.{i}.{key}" for i in layers for key in TE_LAYER_KEYS}


@pytest.mark.parametrize("name", [GPT, "bert-tied-binary"])
def test_te_names_are_the_te_spec_state_dict(tmp_path, name):
    """A TE-layout torch checkpoint stores exactly a TE model's per-layer keys (PP=2: local layer
    numbers), the names map back to the local ones, and opening it recognises the layout."""
    cfg = variant(name)
    block = "decoder" if cfg.arch == "gpt" else "encoder"
    layout = ShardLayout(cfg, tp=2, pp=2, transformer_impl=TE)
    save_full_state(random_state(cfg, 0), layout, tmp_path / "te")
    ckpt = TorchCheckpoint.open(tmp_path / "te")
    assert ckpt.layout.transformer_impl == TE and ckpt.args.transformer_impl == TE
    ckpt.validate_tensors()
    for tp_rank, pp_rank in layout.ranks:
        stored = {k for k in ckpt.model_state(tp_rank, pp_rank) if ".layers." in k}
        assert stored == te_layer_keys(block, range(1))  # 2 layers, one per stage
    for global_name, _, _ in iter_params(cfg):
        assert local_name(impl_name(global_name, TE)) == global_name
    assert impl_name(f"{block}.layers.3.input_layernorm.bias", TE) == \
        f"{block}.layers.3.self_attention.linear_qkv.layer_norm_bias"


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_te_and_local_checkpoints_convert_into_each_other(tmp_path, fmt, model_parallel):
    """TE (TP=2, PP=2) -> local (TP=1) -> TE (TP=2): the same tensors; the local result loads
    strictly into a real local-spec megatron-core model."""
    cfg = variant(GPT)
    state = random_state(cfg, 1)
    save_full_state(state, ShardLayout(cfg, 2, 2, transformer_impl=TE), tmp_path / "te", fmt=fmt)
    run_conversion(plan_conversion("reshard", tmp_path / "te", tmp_path / "local", target_tp=1,
                                   target_pp=1, fmt=fmt, target_impl="local"))
    back, layout = load_full_state(tmp_path / "local")
    assert layout.transformer_impl == "local"
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    if fmt == "torch":
        model = build_model(cfg)
        model.load_state_dict(TorchCheckpoint.open(tmp_path / "local").model_state(0, 0),
                              strict=True)
    run_conversion(plan_conversion("reshard", tmp_path / "local", tmp_path / "te2", target_tp=2,
                                   target_pp=1, fmt=fmt, target_impl=TE))
    again, layout = load_full_state(tmp_path / "te2")
    assert layout.transformer_impl == TE
    assert all(torch.equal(again[k], state[k]) for k in state)
    if fmt == "torch_dist":
        ckpt = DistCheckpoint.open(tmp_path / "te2")
        assert ckpt.args.transformer_impl == TE
        assert "decoder.layers.self_attention.core_attention._extra_state/shard_0_2" in \
            ckpt.metadata.state_dict_metadata


def test_vcycle_hand_off_between_te_and_local_levels(tmp_path, model_parallel):
    """A TE-trained level coalesces into a local-spec one and de-coalesces back into TE names:
    the tensors are those of the same operators on local-named checkpoints."""
    cfg = variant(GPT, units=4, layers=4)
    schemes = LevelSchemes.from_factors(2, 2)
    state = random_state(cfg, 2)
    save_full_state(state, ShardLayout(cfg, transformer_impl=TE), tmp_path / "te")
    save_full_state(state, ShardLayout(cfg), tmp_path / "local")
    for src, impl in (("te", "local"), ("local", "local")):
        run_conversion(plan_conversion("coalesce", tmp_path / src, tmp_path / f"{src}-small",
                                       schemes=schemes, target_impl=impl))
    small_from_te, layout = load_full_state(tmp_path / "te-small")
    small_from_local, _ = load_full_state(tmp_path / "local-small")
    assert layout.transformer_impl == "local"
    assert all(torch.equal(small_from_te[k], small_from_local[k]) for k in small_from_local)
    model = build_model(layout.cfg)  # the small level trains on the local spec
    load_full_state_dict(model, small_from_te)
    run_conversion(plan_conversion("decoalesce", tmp_path / "te-small", tmp_path / "te-large",
                                   schemes=schemes, target_impl=TE))
    large, layout = load_full_state(tmp_path / "te-large")
    assert layout.transformer_impl == TE and set(large) == set(state)
