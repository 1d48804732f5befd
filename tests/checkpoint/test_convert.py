"""Sharded conversion with real megatron-core models: resharded/converted checkpoints load into
models at the target layout and compute the same logits (gloo, multi-process)."""

from __future__ import annotations

import pytest
import torch

from mlmega.checkpoint.convert import run_conversion
from mlmega.checkpoint.convert_plan import plan_conversion
from mlmega.checkpoint.formats import load_full_state, save_full_state
from mlmega.checkpoint.layout import ShardLayout
from mlmega.checkpoint.torch_format import TorchCheckpoint
from mlmega.config.model import ModelConfig
from mlmega.operators import LevelSchemes, coalesce, decoalesce, interpolate
from tests.helpers import make_model_state
from tests.multiproc import checkpoint_logits, forward

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

MODELS = {
    "gpt-gqa-swiglu-untied": ModelConfig(
        arch="gpt", num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4,
        activation="swiglu", tie_embeddings=False, position_embedding="rope",
        normalization="RMSNorm", vocab_size=200, max_sequence_length=16),
    "gpt-tied": ModelConfig(arch="gpt", num_layers=4, hidden_size=64, num_attention_heads=4,
                            vocab_size=200, max_sequence_length=16),
    "bert-binary": ModelConfig(arch="bert", num_layers=4, hidden_size=64, num_attention_heads=4,
                               vocab_size=200, max_sequence_length=16, bert_binary_head=True),
}
IDS = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))


def reference_logits(cfg, state) -> torch.Tensor:
    """Logits of the unsharded model (TP=1, PP=1) in this process."""
    from mlmega.models.build import build_model
    from mlmega.models.state import load_full_state_dict

    model = build_model(cfg)
    load_full_state_dict(model, state)
    model.eval()
    with torch.no_grad():
        return forward(model, cfg, IDS)[..., : cfg.vocab_size]


@pytest.mark.parametrize("name", list(MODELS))
def test_reshard_preserves_logits(tmp_path, name, model_parallel):
    cfg = MODELS[name]
    state = make_model_state(cfg, seed=1)
    expected = reference_logits(cfg, state)
    save_full_state(state, ShardLayout(cfg, 2, 2), tmp_path / "tp2pp2", iteration=5)
    roots = [tmp_path / "tp2pp2"]
    for tp, pp in [(1, 1), (1, 2), (2, 1)]:
        dst = tmp_path / f"tp{tp}pp{pp}"
        run_conversion(plan_conversion("reshard", roots[0], dst, target_tp=tp, target_pp=pp))
        assert TorchCheckpoint.open(dst).iteration == 5
        back, layout = load_full_state(dst)
        assert (layout.tp, layout.pp) == (tp, pp)
        assert all(torch.equal(back[k], state[k]) for k in state), "reshard must be bit-exact"
        roots.append(dst)
    # every layout's real megatron-core models (the TP=2 x PP=2 source included: the layout splits
    # as megatron does) compute the unsharded model's logits
    for root, logits in zip(roots, checkpoint_logits(roots, IDS)):
        torch.testing.assert_close(logits, expected, rtol=0, atol=2e-5, msg=str(root))


def test_decoalesce_and_reshard_in_one_step_match_the_operators(tmp_path, model_parallel):
    small = MODELS["gpt-gqa-swiglu-untied"]
    schemes = LevelSchemes.from_factors(width_factor=2, depth_factor=2)
    state = make_model_state(small, seed=2)
    save_full_state(state, ShardLayout(small, 2, 1), tmp_path / "small")
    run_conversion(plan_conversion("decoalesce", tmp_path / "small", tmp_path / "large",
                                   schemes=schemes, target_tp=1, target_pp=2))
    got, layout = load_full_state(tmp_path / "large")
    expected, large_cfg = decoalesce(state, small, schemes)
    assert layout.cfg.replace(source="") == large_cfg.replace(source="")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # coalescing the sharded large checkpoint gives back the small model exactly (invariant 2)
    run_conversion(plan_conversion("coalesce", tmp_path / "large", tmp_path / "again",
                                   schemes=schemes, target_tp=2, target_pp=1))
    again, _ = load_full_state(tmp_path / "again")
    assert all(torch.equal(again[k], state[k]) for k in state)
    # width de-coalescing of an untied pre-LN model preserves the function (sharded, end to end)
    width_only = LevelSchemes.from_factors(width_factor=2)
    run_conversion(plan_conversion("decoalesce", tmp_path / "small", tmp_path / "wide",
                                   schemes=width_only, target_tp=2, target_pp=2))
    wide_cfg = TorchCheckpoint.open(tmp_path / "wide").layout.cfg
    assert wide_cfg.hidden_size == 2 * small.hidden_size
    [logits] = checkpoint_logits([tmp_path / "wide"], IDS)
    torch.testing.assert_close(logits, reference_logits(small, state), rtol=0, atol=2e-5)


@pytest.mark.parametrize("model,schemes,target", [
    ("bert-binary", LevelSchemes.from_factors(width_factor=2, depth_factor=2), None),
    # vocab padded to 512 rows at TP=4: ranks 2 and 3 hold padding only; tied: embedding x 1/2
    ("gpt-tied", LevelSchemes.from_factors(width_factor=2, width_kind="adjacent"), (4, 1)),
    # a rank's heads: whole rows of the (small head, copy) grid at TP=2, part of a row at TP=4
    ("gpt-tied", LevelSchemes.from_factors(width_factor=2, width_kind="adjacent"), (2, 1)),
    ("bert-binary", LevelSchemes.from_factors(width_factor=2), (4, 2)),
    # explicit groups: no broadcast, the de-coalesced tensors are made and split
    ("gpt-gqa-swiglu-untied", LevelSchemes.from_dict({"width": [[0, 3], [1, 2]]}, "custom"),
     (1, 2)),
], ids=["bert-stacked-depth", "gpt-tied-adjacent-tp4", "gpt-tied-adjacent-tp2",
        "bert-stacked-tp4", "gpt-gqa-custom"])
def test_interpolate_conversion_matches_the_operators(tmp_path, model_parallel, model, schemes,
                                                      target):
    """Sharded interpolation equals the unsharded operators bit for bit, whether the embeddings
    are mixed from a broadcast view (regular schemes) or from de-coalesced tensors."""
    large = MODELS[model]
    large_state = make_model_state(large, seed=3)
    small_state, small_cfg = coalesce(large_state, large, schemes)
    small_state = {k: v + 0.01 for k, v in small_state.items()}  # "trained" small level
    save_full_state(large_state, ShardLayout(large, 2, 2), tmp_path / "large")
    save_full_state(small_state, ShardLayout(small_cfg, 1, 1), tmp_path / "small")
    tp, pp = target or (None, None)
    run_conversion(plan_conversion("interpolate", tmp_path / "small", tmp_path / "next",
                                   schemes=schemes, large=tmp_path / "large", alpha=0.25,
                                   target_tp=tp, target_pp=pp), workers=2)
    got, layout = load_full_state(tmp_path / "next")
    assert (layout.tp, layout.pp) == (target or (2, 2)), "defaults to the large level's layout"
    deco, _ = decoalesce(small_state, small_cfg, schemes)
    expected = interpolate(large_state, deco, large, 0.25)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("op", ["reshard", "coalesce", "decoalesce", "interpolate"])
def test_every_stored_shard_is_the_split_of_the_operators_result(tmp_path, model_parallel, op):
    """The files hold, rank by rank, exactly what splitting the unsharded result gives: vocab
    shards (made block by block of rows) included, with their zero padding (vocab 200 at TP=4:
    ranks 2 and 3 hold padding only; untied: the output layer too)."""
    large = MODELS["gpt-gqa-swiglu-untied"].replace(num_query_groups=8)  # small: 4 groups
    schemes = LevelSchemes.from_factors(width_factor=2, depth_factor=2)
    large_state = make_model_state(large, seed=4)
    coalesced, small_cfg = coalesce(large_state, large, schemes)
    small_state = {k: v + 0.01 for k, v in coalesced.items()}
    save_full_state(large_state, ShardLayout(large, 2, 2), tmp_path / "large")
    save_full_state(small_state, ShardLayout(small_cfg, 1, 1), tmp_path / "small")
    decoalesced = decoalesce(small_state, small_cfg, schemes)[0]
    src, cfg, expected = {
        "reshard": (tmp_path / "large", large, large_state),
        "coalesce": (tmp_path / "large", small_cfg, coalesced),
        "decoalesce": (tmp_path / "small", large, decoalesced),
        "interpolate": (tmp_path / "small", large,
                        interpolate(large_state, decoalesced, large, 0.25)),
    }[op]
    run_conversion(plan_conversion(op, src, tmp_path / "out", target_tp=4, target_pp=2,
                                   schemes=None if op == "reshard" else schemes, alpha=0.25,
                                   large=tmp_path / "large" if op == "interpolate" else None),
                   workers=2)
    out = TorchCheckpoint.open(tmp_path / "out")
    layout = ShardLayout(cfg, 4, 2)
    assert out.layout.cfg.replace(source="") == cfg.replace(source="")
    for tp_rank, pp_rank in layout.ranks:
        stored = out.model_state(tp_rank, pp_rank)
        for p in layout.pp_stage_params(pp_rank):
            want = layout.split(p.spec, expected[p.global_name], tp_rank)
            assert torch.equal(stored[p.local_name], want), (tp_rank, pp_rank, p.local_name)
