"""Invariant 3: width de-coalescing duplicates units.

Partner heads / query groups / FFN chunks / hidden chunks are identical after de-coalescing, and
every linear map commutes with duplication: W_large (T x) + b_large = T (W_small x + b_small),
where T copies each small unit to the members of its group (element level: I_lead ⊗ T ⊗ I_chunk).
The layouts below are written out by hand from megatron-core's module structure, not read from
mlmega's parameter table.
"""

import pytest
import torch

from mlmega.operators import LevelMap, LevelSchemes, coalesce, decoalesce, width
from tests.helpers import make_model_state, variant
from tests.operators.schemes import SCHEMES, WIDTH

pytestmark = pytest.mark.usefixtures("model_parallel")

NAMES = ["gpt-mha-gelu-untied-abs-ln-bias", "gpt-gqa-swiglu-tied-rope-rms-bias",
         "gpt-gqa-gelu-untied-rope-ln-bias", "bert-untied-binary", "bert-tied-nobinary"]
CASES = [(n, s) for n in NAMES for s in WIDTH]
IDS = [f"{n}-{s}" for n, s in CASES]


def _decoalesced(name, scheme):
    small_cfg = variant(name)
    small = make_model_state(small_cfg, seed=5)
    large, large_cfg = decoalesce(small, small_cfg, SCHEMES[scheme])
    grouping = LevelMap.from_small(small_cfg, SCHEMES[scheme]).width
    return small, small_cfg, large, large_cfg, grouping


def _spaces(cfg):
    """(lead, chunk per unit) of each width-scaled space of cfg."""
    units = cfg.num_query_groups
    return {"embed": (1, cfg.hidden_size // units),
            "qkv": (1, (cfg.heads_per_group + 2) * cfg.head_dim),
            "heads": (1, cfg.heads_per_group * cfg.head_dim),
            "ffn": (1, cfg.ffn_hidden_size // units),
            "fc1": (2 if cfg.gated else 1, cfg.ffn_hidden_size // units)}


def _width_dims(key):
    """The width space of each dim of a parameter (None: not width-scaled), by module name."""
    rules = [("linear_qkv.weight", ("qkv", "embed")), ("linear_qkv.bias", ("qkv",)),
             ("linear_proj.weight", ("embed", "heads")), ("linear_fc1.weight", ("fc1", "embed")),
             ("linear_fc1.bias", ("fc1",)), ("linear_fc2.weight", ("embed", "ffn")),
             ("_embeddings.weight", (None, "embed")), ("dense.weight", ("embed", "embed")),
             ("output_layer.weight", (None, "embed")), ("binary_head.weight", (None, "embed")),
             ("output_layer.bias", (None,)), ("binary_head.bias", (None,))]
    for suffix, dims in rules:
        if key.endswith(suffix):
            return dims
    return ("embed",)  # norms, proj / fc2 / dense biases


@pytest.mark.parametrize("name,scheme", CASES, ids=IDS)
def test_partner_units_are_identical(name, scheme):
    _, _, large, cfg, grouping = _decoalesced(name, scheme)
    spaces, units = _spaces(cfg), cfg.num_query_groups
    checked = 0
    for key, tensor in large.items():
        for dim, space in enumerate(_width_dims(key)):
            if space is None:
                continue
            lead, chunk = spaces[space]
            view = tensor.movedim(dim, 0).reshape(lead, units, chunk, -1)
            for group in grouping.groups:
                for member in group[1:]:
                    assert torch.equal(view[:, member], view[:, group[0]]), (key, dim, group)
                    checked += 1
    assert checked > 10 * cfg.num_layers


def _expand(unit_matrix, lead, chunk):
    return torch.kron(torch.eye(lead, dtype=torch.float64),
                      torch.kron(unit_matrix.contiguous(), torch.eye(chunk, dtype=torch.float64)))


@pytest.mark.parametrize("name,scheme", CASES, ids=IDS)
def test_linear_maps_commute_with_duplication(name, scheme):
    small, small_cfg, large, cfg, grouping = _decoalesced(name, scheme)
    t_unit = grouping.copy_matrix()
    spaces = _spaces(small_cfg)  # chunks are the same size in both models
    t = {space: _expand(t_unit, lead, chunk) for space, (lead, chunk) in spaces.items()}
    layer = "decoder" if cfg.arch == "gpt" else "encoder"
    linears = {f"{layer}.layers.1.self_attention.linear_qkv": ("qkv", "embed"),
               f"{layer}.layers.1.self_attention.linear_proj": ("embed", "heads"),
               f"{layer}.layers.0.mlp.linear_fc1": ("fc1", "embed"),
               f"{layer}.layers.0.mlp.linear_fc2": ("embed", "ffn"),
               "lm_head.dense": ("embed", "embed"), "pooler.dense": ("embed", "embed"),
               "output_layer": (None, "embed"), "binary_head": (None, "embed")}
    gen = torch.Generator().manual_seed(0)
    tested = 0
    for module, (out_space, in_space) in linears.items():
        if module + ".weight" not in small:
            continue
        w_small, w_large = small[module + ".weight"].double(), large[module + ".weight"].double()
        x = torch.randn(w_small.shape[1], generator=gen, dtype=torch.float64)
        y_small = w_small @ x
        if module + ".bias" in small:
            y_small = y_small + small[module + ".bias"].double()
        y_large = w_large @ (t[in_space] @ x)
        if module + ".bias" in large:
            y_large = y_large + large[module + ".bias"].double()
        expected = y_small if out_space is None else t[out_space] @ y_small
        torch.testing.assert_close(y_large, expected, rtol=1e-6, atol=1e-6, msg=module)
        tested += 1
    assert tested >= 4


@pytest.mark.parametrize("name", ["gpt-mha-gelu-untied-abs-ln-bias",
                                  "gpt-mha-gelu-tied-abs-ln-bias", "bert-tied-binary"])
def test_embeddings_duplicate_when_untied_and_split_when_tied(name):
    """Untied: embedding rows are duplicated (T e). Tied: they are split (T e / g), which keeps the
    tied LM head exact (E_large T h = E_small h) but scales the input embedding by 1/g."""
    small, small_cfg, large, cfg, grouping = _decoalesced(name, "width-stacked")
    chunk = small_cfg.hidden_size // small_cfg.num_query_groups
    t = _expand(grouping.copy_matrix(), 1, chunk).float()
    scale = 1.0 if not cfg.tie_embeddings else 0.5
    for key in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                "embedding.tokentype_embeddings.weight"):
        if key in small:
            torch.testing.assert_close(large[key], scale * small[key] @ t.T, msg=key)
    if cfg.tie_embeddings:
        h = torch.randn(small_cfg.hidden_size)
        emb_small, emb_large = (s["embedding.word_embeddings.weight"] for s in (small, large))
        torch.testing.assert_close(emb_large @ (t @ h), emb_small @ h, rtol=1e-5, atol=1e-5)


def test_stacked_scheme_pairs_unit_i_with_i_plus_half_explicitly():
    """Concrete layout check on a 2 -> 4 head GPT: fc1 rows, QKV blocks and proj columns."""
    small, small_cfg, large, cfg, _ = _decoalesced("gpt-mha-gelu-untied-abs-ln-bias",
                                                   "width-stacked")
    c = cfg.ffn_hidden_size // 4  # FFN chunk per unit
    fc1_s, fc1_l = small["decoder.layers.0.mlp.linear_fc1.weight"], \
        large["decoder.layers.0.mlp.linear_fc1.weight"]
    for i in range(2):
        assert torch.equal(fc1_l[i * c:(i + 1) * c], fc1_l[(i + 2) * c:(i + 3) * c])
        # columns: large hidden chunk j (head_dim wide) holds half of small chunk j % 2
        for j in range(4):
            torch.testing.assert_close(fc1_l[i * c:(i + 1) * c, 8 * j:8 * j + 8],
                                       fc1_s[i * c:(i + 1) * c, 8 * (j % 2):8 * (j % 2) + 8] / 2)
    qkv = large["decoder.layers.1.self_attention.linear_qkv.weight"].reshape(4, 3 * 8, -1)
    assert torch.equal(qkv[0], qkv[2]) and torch.equal(qkv[1], qkv[3])
    assert not torch.equal(qkv[0], qkv[1])
    proj = large["decoder.layers.1.self_attention.linear_proj.weight"].reshape(32, 4, 8)
    assert torch.equal(proj[:, 0], proj[:, 2]) and torch.equal(proj[:, 1], proj[:, 3])
    ln = large["decoder.final_layernorm.weight"]
    assert torch.equal(ln, small["decoder.final_layernorm.weight"].repeat(2))


def _assert_equal_to_general_path(operator, state, cfg, schemes, fast_path, monkeypatch):
    """``operator`` (coalesce / decoalesce) gives every tensor bit for bit as it does with the
    fast path ``fast_path`` (a function of ``width`` returning None: the general path taken)."""
    fast, _ = operator(state, cfg, schemes)
    with monkeypatch.context() as m:
        m.setattr(width, fast_path, lambda *args: None)
        general, _ = operator(state, cfg, schemes)
    dtype = next(iter(state.values())).dtype
    for key, tensor in general.items():
        assert fast[key].dtype == dtype and torch.equal(fast[key], tensor), key


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["stacked", "adjacent"])
@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_broadcast_copy_equals_index_selection(name, kind, factor, dtype, monkeypatch):
    """De-coalescing with a regular scheme is one broadcast copy (``broadcast_copies``); every
    tensor equals the general path's (index selections per width dim) bit for bit."""
    small_cfg = variant(name)
    small = {k: v.to(dtype) for k, v in make_model_state(small_cfg, seed=6).items()}
    schemes = LevelSchemes.from_factors(width_factor=factor, width_kind=kind)
    _assert_equal_to_general_path(decoalesce, small, small_cfg, schemes, "broadcast_copies",
                                  monkeypatch)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["stacked", "adjacent"])
@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_group_members_equal_index_selection(name, kind, factor, dtype, monkeypatch):
    """Coalescing with a regular scheme sums strided views of each group's members
    (``_member_views``); every tensor equals the general path's (index selections) bit for bit."""
    small_cfg = variant(name)
    schemes = LevelSchemes.from_factors(width_factor=factor, width_kind=kind)
    large, large_cfg = decoalesce(make_model_state(small_cfg, seed=7), small_cfg, schemes)
    noise = torch.Generator().manual_seed(8)  # partners differ, so the sums are not trivial
    large = {k: (v + 0.1 * torch.randn(v.shape, generator=noise)).to(dtype)
             for k, v in large.items()}
    _assert_equal_to_general_path(coalesce, large, large_cfg, schemes, "_member_views",
                                  monkeypatch)
