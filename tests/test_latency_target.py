"""Solving for a measured speedup under timing noise (dnnprune/pruning/latency_target.py)."""

from __future__ import annotations

import random
from typing import Callable

import pytest

from dnnprune.errors import PruningError
from dnnprune.pruning.latency_target import fitted_crossing, solve_latency


def _noisy(true: Callable[[float], float], noise: float, seed: int) -> Callable[[dict, int], float]:
    """A speedup measurement: the true curve times uniform noise that shrinks with more repeats."""
    rng = random.Random(seed)

    def speedup_of(plan: dict, repeats: int) -> float:
        scale = noise * (15 / repeats) ** 0.5
        return true(plan["knob"]) * (1 + rng.uniform(-scale, scale))
    return speedup_of


def _plan_at(knob: float) -> dict:
    return {"knob": knob}


def test_the_fitted_knob_lands_closer_to_the_target_than_bisection_alone() -> None:
    """Bisection on noisy timings keeps the first knob that read high; the fit averages the noise away."""
    true = lambda knob: 1.0 + 2.0 * knob  # noqa: E731  (2x at knob 0.5)
    fitted_errors, bisection_errors = [], []
    for seed in range(30):
        solution, points = solve_latency(_noisy(true, 0.06, seed), _plan_at, 2.0, repeats=15, tolerance=0.05)
        fitted_errors.append(abs(true(solution.knob) / 2.0 - 1))
        bisection_knob = min(k for k, s in points[:8] if s >= 2.0)  # what plain bisection would have kept
        bisection_errors.append(abs(true(bisection_knob) / 2.0 - 1))
    assert sum(fitted_errors) < 0.7 * sum(bisection_errors)
    assert max(fitted_errors) < 0.05


def test_the_reported_speedup_is_the_verification_measurement() -> None:
    calls: list[int] = []

    def speedup_of(plan: dict, repeats: int) -> float:
        calls.append(repeats)
        return 1.0 + 3.0 * plan["knob"]

    solution, points = solve_latency(speedup_of, _plan_at, 2.5, repeats=10, tolerance=0.05)
    assert solution.knob == pytest.approx(0.5, abs=0.005)  # a line in log-speedup: nearly exact here
    assert solution.factor == pytest.approx(2.5, rel=0.01)
    assert calls[-1] == 30  # the verification is three times longer than a search measurement
    assert len(points) == len(calls)


def test_an_unreachable_speedup_is_refused_with_the_best_measured() -> None:
    with pytest.raises(PruningError, match=r"cannot make the model 5x faster.*1\.80x"):
        solve_latency(lambda plan, repeats: 1.0 + 0.8 * plan["knob"], _plan_at, 5.0, repeats=5, tolerance=0.05)


def test_a_flat_or_falling_curve_keeps_the_bisection_knob() -> None:
    assert fitted_crossing([(0.2, 2.0), (0.4, 2.0)], 2.0, default=0.4) == 0.4
    assert fitted_crossing([(0.2, 2.2), (0.4, 1.9)], 2.0, default=0.3) == 0.3
    assert fitted_crossing([(0.5, 2.0)], 2.0, default=0.5) == 0.5
