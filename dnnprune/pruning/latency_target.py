"""Solving for a measured speedup (`--target latency:F`).

A timing on a shared CPU moves by a few percent between repeats, so plain bisection on it picks the
first plan whose measurement happened to read high (a winner's curse): a fresh measurement of that
plan then reads below the target. Here every bisection measurement is kept, log-speedup is fitted
against the knob near the crossing (the fit averages their noise), and the fitted crossing is
verified with a longer measurement, refitting a few times if the verification misses the tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from dnnprune.errors import PruningError
from dnnprune.pruning.structured import Plan, TargetSolution

SpeedupOf = Callable[[Plan, int], float]
"""(plan, repeats) -> measured speedup of the plan's model over the original."""

BISECTION_STEPS = 7
VERIFY_REPEATS_FACTOR = 3
REFITS = 3


@dataclass
class Search:
    """The measurements made so far, as (knob, speedup) pairs."""

    points: list[tuple[float, float]] = field(default_factory=list)

    def measure(self, speedup_of: SpeedupOf, plan_at: Callable[[float], Plan], knob: float, repeats: int) -> float:
        speedup = speedup_of(plan_at(knob), repeats)
        self.points.append((knob, speedup))
        return speedup


def solve_latency(speedup_of: SpeedupOf, plan_at: Callable[[float], Plan], factor: float, *, repeats: int,
                  tolerance: float) -> tuple[TargetSolution, list[tuple[float, float]]]:
    """The knob whose plan measures `factor` times faster, within `tolerance` (relative) where it can.

    Returns the solution (its `factor` is the verified speedup) and every (knob, speedup) measured.
    """
    search = Search()
    best = search.measure(speedup_of, plan_at, 1.0, repeats)
    if best < factor * (1 - tolerance):
        raise PruningError(f"cannot make the model {factor:g}x faster without emptying layers: every layer at its cap "
                           f"measured {best:.2f}x (max_ratio, min_channels, min_fraction, excluded layers)")
    low, high = 0.0, 1.0
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if search.measure(speedup_of, plan_at, middle, repeats) >= factor:
            high = middle
        else:
            low = middle
    knob, verified = high, 0.0
    for _ in range(REFITS):
        knob = fitted_crossing(search.points, factor, default=knob)
        verified = search.measure(speedup_of, plan_at, knob, repeats * VERIFY_REPEATS_FACTOR)
        if abs(verified / factor - 1) <= tolerance:
            break
    return TargetSolution(plan_at(knob), knob, verified, {}), search.points


def fitted_crossing(points: list[tuple[float, float]], factor: float, *, default: float, window: float = 0.25,
                    span: float = 1.5) -> float:
    """The knob where a least-squares line of log-speedup on knob crosses log(factor).

    Only points within `window` of the bisection's knob (`default`) and within `span` times the target
    speedup either way are fitted: wide enough that the slope is not noise (bisection's last points sit
    close together), narrow enough that the curve's bend does not matter (in simulation, +-0.25 beat
    +-0.06 and +-0.125 on straight, convex and stepped curves; on VGG-16 a point at 5.6x pulled the fit
    for 2x). Falls back to `default` when the points cannot define a rising line.
    """
    near = [(k, math.log(max(s, 1e-9))) for k, s in points
            if abs(k - default) <= window and factor / span <= s <= factor * span]
    xs = [k for k, _ in near]
    if len(set(xs)) < 2:
        return default
    mean_x, mean_y = sum(xs) / len(xs), sum(y for _, y in near) / len(near)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in near) / spread
    if slope <= 0:
        return default
    knob = mean_x + (math.log(factor) - mean_y) / slope
    return min(1.0, max(0.0, knob))
