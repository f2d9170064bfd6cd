"""Pareto frontier: the points no other point beats on both axes (pure, no plotting)."""

from __future__ import annotations

import math


def pareto_front(points: list[tuple[float, float]], maximize_y: bool = False) -> list[int]:
    """Indices of the non-dominated points, minimizing x and minimizing (or maximizing) y.

    A point is dominated when another is at least as good on both axes and better on one. Points
    with a missing or non-finite coordinate are never on the frontier.
    """
    def good(i: int) -> bool:
        x, y = points[i]
        return x is not None and y is not None and math.isfinite(x) and math.isfinite(y)

    sign = -1.0 if maximize_y else 1.0
    front = []
    for i in range(len(points)):
        if not good(i):
            continue
        xi, yi = points[i][0], sign * points[i][1]
        dominated = False
        for j in range(len(points)):
            if j == i or not good(j):
                continue
            xj, yj = points[j][0], sign * points[j][1]
            if xj <= xi and yj <= yi and (xj < xi or yj < yi):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front
