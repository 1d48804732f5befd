"""The baseline frontier C_base(L) and the compute-equivalent saving, on known numbers."""

from __future__ import annotations

import pytest

from benchmarks.frontier import AT_LEAST, AT_MOST, EXACT, cost_to_reach, pareto, saving

# budgets 50..100% of 100 FLOPs, final losses falling with the budget; one noisy point (87.5%
# ends worse than 75%) is beaten by a cheaper budget and leaves the frontier
POINTS = [(50.0, 4.0), (62.5, 3.8), (75.0, 3.6), (87.5, 3.65), (100.0, 3.4)]


def test_the_frontier_keeps_the_points_no_cheaper_point_beats():
    assert pareto(POINTS) == [(50.0, 4.0), (62.5, 3.8), (75.0, 3.6), (100.0, 3.4)]


@pytest.mark.parametrize("loss, cost", [
    (4.0, 50.0), (3.9, 56.25), (3.7, 68.75), (3.6, 75.0), (3.5, 87.5), (3.4, 100.0)])
def test_cost_interpolates_linearly_between_budgets(loss, cost):
    assert cost_to_reach(POINTS, loss).value == pytest.approx(cost)
    assert cost_to_reach(POINTS, loss).bound == EXACT


def test_beyond_the_frontier_the_cost_is_a_bound():
    assert cost_to_reach(POINTS, 3.3) == cost_to_reach(POINTS, 3.0)
    assert cost_to_reach(POINTS, 3.3).bound == AT_LEAST and cost_to_reach(POINTS, 3.3).value == 100
    assert cost_to_reach(POINTS, 4.2).bound == AT_MOST and cost_to_reach(POINTS, 4.2).value == 50


def test_saving_is_one_minus_the_cost_ratio_at_equal_loss():
    # a run ending at 3.5 for 70 FLOPs: the baseline needs 87.5 for 3.5 -> 20% saved
    assert saving(70.0, 3.5, POINTS).value == pytest.approx(0.2)
    # below every budget's loss: at least 1 - 70/100
    beyond = saving(70.0, 3.3, POINTS)
    assert (beyond.bound, beyond.value) == (AT_LEAST, pytest.approx(0.3))
    # worse than the smallest budget at more cost: at most 1 - 80/50 (a loss)
    worse = saving(80.0, 4.1, POINTS)
    assert (worse.bound, worse.value) == (AT_MOST, pytest.approx(-0.6))
