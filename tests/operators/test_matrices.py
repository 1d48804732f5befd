"""Invariant 1: the width matrices F (average) and T (copy) and the depth matrices R, G."""

import pytest
import torch

from mlmega.operators import Grouping, SchemeSpec

GROUPINGS = {
    "adjacent-2of8": SchemeSpec("adjacent", 2).resolve(8, "heads"),
    "stacked-2of8": SchemeSpec("stacked", 2).resolve(8, "heads"),
    "adjacent-3of6": SchemeSpec("adjacent", 3).resolve(6, "heads"),
    "stacked-4of8": SchemeSpec("stacked", 4).resolve(8, "heads"),
    "custom-3of6": SchemeSpec("custom", groups=((5, 0, 3), (1, 4, 2))).resolve(6, "heads"),
    "custom-4of8": SchemeSpec("custom", groups=((0, 5, 2, 7), (4, 1, 6, 3))).resolve(8, "heads"),
}


def test_named_schemes_resolve_to_the_documented_groups():
    assert GROUPINGS["adjacent-2of8"].groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert GROUPINGS["stacked-2of8"].groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert GROUPINGS["adjacent-3of6"].groups == ((0, 1, 2), (3, 4, 5))
    assert GROUPINGS["stacked-4of8"].groups == ((0, 2, 4, 6), (1, 3, 5, 7))


@pytest.mark.parametrize("grouping", GROUPINGS.values(), ids=GROUPINGS.keys())
def test_width_matrix_invariants(grouping: Grouping):
    f, t = grouping.average_matrix(), grouping.copy_matrix()
    small, large = grouping.num_groups, grouping.size
    g = large // small
    assert f.shape == (small, large) and t.shape == (large, small)
    eye = torch.eye(small, dtype=torch.float64)
    torch.testing.assert_close(f @ t, eye, rtol=0, atol=1e-15)  # F T = I
    torch.testing.assert_close(t.T @ t, g * eye, rtol=0, atol=0)  # T^T T = g I
    rownorm_tt = t.T / t.T.sum(dim=1, keepdim=True)
    torch.testing.assert_close(rownorm_tt, f, rtol=0, atol=1e-15)  # rownorm(T^T) = F
    assert (f >= 0).all()
    torch.testing.assert_close(f.sum(dim=1), torch.ones(small, dtype=f.dtype))  # row-stochastic
    assert set(t.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(t.sum(dim=1), torch.ones(large, dtype=t.dtype))  # one 1 per row
    for i, group in enumerate(grouping.groups):  # T copies the small unit of each member's group
        for member in group:
            assert t[member, i] == 1 and grouping.group_of(member) == i


@pytest.mark.parametrize("kind,factor,layers,expected", [
    ("adjacent", 2, 4, ((0, 1), (2, 3))),
    ("stacked", 2, 4, ((0, 2), (1, 3))),
    ("adjacent", 3, 6, ((0, 1, 2), (3, 4, 5))),
    ("custom", None, 5, ((0, 4), (1, 2, 3))),  # unequal groups are fine for depth
], ids=["adjacent-2", "stacked-2", "adjacent-3", "custom-unequal"])
def test_depth_matrix_invariants(kind, factor, layers, expected):
    spec = SchemeSpec(kind, factor, expected if kind == "custom" else None)
    grouping = spec.resolve(layers, "num_layers")
    assert grouping.groups == expected
    r, g = grouping.average_matrix(), grouping.copy_matrix()  # R (l x L), G = rownorm(R^T) (L x l)
    torch.testing.assert_close(r @ g, torch.eye(len(expected), dtype=r.dtype), rtol=0, atol=1e-15)
    torch.testing.assert_close(r.sum(dim=1), torch.ones(len(expected), dtype=r.dtype))
    for i, group in enumerate(expected):
        torch.testing.assert_close(r[i, list(group)], torch.full((len(group),), 1 / len(group),
                                                                 dtype=r.dtype))
    torch.testing.assert_close(g, (r.T > 0).to(g.dtype) / (r.T > 0).sum(1, keepdim=True))
