"""The increments planner lands on its size goal: the threshold's plan, then channels given back."""

from __future__ import annotations

import pytest
import torch

from dnnprune.models import create_model
from dnnprune.pruning.increments import Curves, IncrementEnvironment, fill_to_goal, plan_to
from dnnprune.pruning.structured import Limits, pruned_size
from dnnprune.surgery import ChannelGraph
from dnnprune.tasks import TaskSpec, make_task


def _curves(drops: dict[str, list[float]], widths: dict[str, int]) -> Curves:
    ratios = [0.0, 0.25, 0.5, 0.75]
    return Curves({n: ratios for n in drops}, {n: [0.0, *d] for n, d in drops.items()}, widths)


def test_drop_at_interpolates_between_grid_points_and_stays_flat_past_the_last() -> None:
    curves = _curves({"a": [0.01, 0.02, 0.10]}, {"a": 64})
    assert curves.drop_at("a", 0.0) == 0.0
    assert curves.drop_at("a", 0.125) == pytest.approx(0.005)
    assert curves.drop_at("a", 0.625) == pytest.approx(0.06)
    assert curves.drop_at("a", 0.9) == pytest.approx(0.10)
    assert curves.drop_at("not analysed", 0.5) == 0.0


def test_fill_gives_back_where_the_analysis_predicts_most_drop_per_size() -> None:
    """Two layers over the goal by a chunk each; only one chunk fits, and it goes to the sensitive one."""
    widths = {"cheap": 64, "sensitive": 64}
    curves = _curves({"cheap": [0.001, 0.002, 0.003], "sensitive": [0.05, 0.10, 0.20]}, widths)

    def size_of(plan: dict[str, int]) -> int:
        return sum(widths[n] - cut for n, cut in plan.items())  # one unit of size per channel kept

    plan = {"cheap": 32, "sensitive": 32}  # 64 kept; the goal allows 80
    filled = fill_to_goal(plan, widths, curves, size_of, goal=80, round_to=16)
    assert filled == {"cheap": 32, "sensitive": 16}
    assert fill_to_goal(plan, widths, curves, size_of, goal=70, round_to=16) == plan  # no chunk fits
    assert fill_to_goal(plan, widths, curves, size_of, goal=200, round_to=16) == {"cheap": 0, "sensitive": 0}


def test_plan_lands_within_one_chunk_of_its_goal_on_a_real_net() -> None:
    """On resnet20 with widths in steps of 8, the plan is within the goal and no chunk of 8 more fits."""
    model = create_model("resnet20", num_classes=10, in_channels=1)
    shape = (1, 32, 32)
    graph = ChannelGraph(model, shape)
    widths = {g.name: g.width for g in graph.groups}
    # flat curves with a jump: a single threshold moves many layers at once
    curves = _curves({n: [0.001 * (i % 3), 0.01, 0.05] for i, n in enumerate(widths)}, widths)
    env = IncrementEnvironment(input_shape=shape, limits=Limits(round_to=8), metric="macs", factor=2.0, max_drop=1.0,
                               task=make_task(TaskSpec()), score=lambda m, g: {}, evaluate=lambda m: None,  # type: ignore[arg-type,return-value]
                               finetune=lambda m, label: 0, analyze=None)
    unit = {n: torch.arange(w, dtype=torch.float32) for n, w in widths.items()}
    base = pruned_size(model, shape, unit, {})["macs"]
    goal = base / 2.3
    plan, _ = plan_to(model, graph, curves, goal, env)
    size = pruned_size(model, shape, unit, plan)["macs"]
    assert size <= goal
    for name, cut in plan.items():
        if cut:
            assert pruned_size(model, shape, unit, {**plan, name: cut - min(cut, 8)})["macs"] > goal, name
