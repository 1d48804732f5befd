"""The baseline's cost frontier C_base(L) and the compute-equivalent saving of a run against it.

The tuned baseline is trained at several budgets, each with its own complete LR schedule; each
evaluation of each run gives a point (cost, loss), cost being model FLOPs or wall-clock seconds
spent up to it. The frontier keeps the points no cheaper point beats and interpolates linearly
between neighbours:
C_base(L) is the cost at which it reaches loss L. Beyond its ends it is a bound: a loss below every
budget's needs at least the largest cost, one above every budget's at most the smallest.

    saving = 1 - C_run / C_base(L_run)

inherits the bound: at least ('>=') or at most ('<=') the value computed at the frontier's end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

EXACT, AT_LEAST, AT_MOST = "=", ">=", "<="


@dataclass(frozen=True)
class Estimate:
    """A value, exact or a bound (where the frontier ends)."""

    value: float
    bound: str = EXACT


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, loss) points that no cheaper point reaches, by increasing cost."""
    front: list[tuple[float, float]] = []
    for cost, loss in sorted(points):
        if not front or loss < front[-1][1]:
            front.append((cost, loss))
    return front


def cost_to_reach(points: Sequence[tuple[float, float]], loss: float) -> Estimate:
    """C_base(loss) from the baseline's (cost, final loss) budget points."""
    front = pareto(points)
    if loss < front[-1][1]:
        return Estimate(front[-1][0], AT_LEAST)
    if loss > front[0][1]:
        return Estimate(front[0][0], AT_MOST)
    for (c0, l0), (c1, l1) in zip(front, front[1:]):
        if l1 <= loss <= l0:
            return Estimate(c0 + (l0 - loss) / (l0 - l1) * (c1 - c0))
    return Estimate(front[0][0])  # a one-point frontier, hit exactly


def saving(cost: float, loss: float, points: Sequence[tuple[float, float]]) -> Estimate:
    """1 - cost / C_base(loss): the fraction of the baseline's cost for the same loss saved."""
    base = cost_to_reach(points, loss)
    return Estimate(1.0 - cost / base.value, base.bound)
