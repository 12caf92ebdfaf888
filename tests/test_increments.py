"""The increments planner lands on its size goal: the threshold's plan, then channels given back."""

from __future__ import annotations

import pytest
import torch

from dnnprune.models import create_model
from dnnprune.pruning.increments import Curves, IncrementEnvironment, fill_to_goal, plan_to
from dnnprune.pruning.structured import Limits, layer_macs, model_size, pruned_size
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


def _env(shape: tuple[int, ...], layer_cost: object, round_to: int = 8) -> IncrementEnvironment:
    return IncrementEnvironment(input_shape=shape, limits=Limits(round_to=round_to), metric="macs", factor=2.0,
                                max_drop=1.0, task=make_task(TaskSpec()), score=lambda m, g: {},  # type: ignore[arg-type]
                                evaluate=lambda m: None, finetune=lambda m, label: 0, analyze=None,  # type: ignore[arg-type,return-value]
                                layer_cost=layer_cost)  # type: ignore[arg-type]


@pytest.mark.parametrize("priced_by", ["drop threshold", "macs"])
def test_plan_lands_within_one_chunk_of_its_goal_on_a_real_net(priced_by: str) -> None:
    """On resnet20 with widths in steps of 8, the plan is within the goal and no chunk of 8 more fits."""
    model = create_model("resnet20", num_classes=10, in_channels=1)
    shape = (1, 32, 32)
    graph = ChannelGraph(model, shape)
    widths = {g.name: g.width for g in graph.groups}
    # flat curves with a jump: a single threshold moves many layers at once
    curves = _curves({n: [0.001 * (i % 3), 0.01, 0.05] for i, n in enumerate(widths)}, widths)
    env = _env(shape, layer_macs if priced_by == "macs" else None)
    unit = {n: torch.arange(w, dtype=torch.float32) for n, w in widths.items()}
    base = pruned_size(model, shape, unit, {})["macs"]
    goal = base / 2.3
    plan, _ = plan_to(model, graph, curves, goal, env)
    size = pruned_size(model, shape, unit, plan)["macs"]
    assert size <= goal and sum(plan.values()) > 0
    for name, cut in plan.items():
        if cut:
            assert pruned_size(model, shape, unit, {**plan, name: cut - min(cut, 8)})["macs"] > goal, name


def _two_convs() -> torch.nn.Module:
    """Two groups of 32 channels with equal predicted drops; the 16x16 one costs 4x the MACs per channel."""
    return torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),  # 32x32 maps
                               torch.nn.Conv2d(32, 32, 3, stride=2, padding=1), torch.nn.ReLU(),  # 16x16 maps
                               torch.nn.Conv2d(32, 8, 1), torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 4))


def test_cost_aware_plan_cuts_where_a_unit_of_drop_buys_the_most_macs() -> None:
    """Equal curves: the threshold plan cuts both groups alike, the MAC-priced plan the costlier one first."""
    model, shape = _two_convs(), (1, 32, 32)
    graph = ChannelGraph(model, shape)
    widths = {g.name: g.width for g in graph.groups}
    curves = _curves({n: [0.01, 0.02, 0.04] for n in widths}, widths)
    unit = {n: torch.arange(w, dtype=torch.float32) for n, w in widths.items()}
    base = pruned_size(model, shape, unit, {})["macs"]
    goal = base / 1.6
    by_drop, _ = plan_to(model, graph, curves, goal, _env(shape, None))
    by_macs, price = plan_to(model, graph, curves, goal, _env(shape, layer_macs))
    assert by_drop["0"] == by_drop["2"]
    assert by_macs["0"] > by_macs["2"] and price > 0  # conv 0's channels feed the 32x32 and 16x16 convs
    assert pruned_size(model, shape, unit, by_macs)["macs"] <= goal
    predicted = {name: sum(curves.drop_at(n, cut / widths[n]) for n, cut in plan.items())
                 for name, plan in (("drop", by_drop), ("macs", by_macs))}
    assert predicted["macs"] <= predicted["drop"] + 1e-9


def test_cost_aware_plan_follows_a_measured_cost_not_the_macs() -> None:
    """A layer cost that makes the 1x1 conv the slow one moves the cuts to the group it reads."""
    model, shape = _two_convs(), (1, 32, 32)
    graph = ChannelGraph(model, shape)
    widths = {g.name: g.width for g in graph.groups}
    curves = _curves({n: [0.01, 0.02, 0.04] for n in widths}, widths)
    slow = model[4]

    def fake_ms(layer: torch.nn.Module, cin: int, cout: int, spatial: tuple[int, ...]) -> float:
        return cin * cout * (100.0 if layer is slow else 1.0)

    unit = {n: torch.arange(w, dtype=torch.float32) for n, w in widths.items()}
    goal = pruned_size(model, shape, unit, {})["macs"] / 1.3
    plan, _ = plan_to(model, graph, curves, goal, _env(shape, fake_ms))
    assert plan["2"] > plan["0"]  # group "2" is what the slow 1x1 conv reads
    assert pruned_size(model, shape, unit, plan)["macs"] <= goal


def test_a_goal_below_every_floor_takes_all_the_limits_allow() -> None:
    model, shape = _two_convs(), (1, 32, 32)
    graph = ChannelGraph(model, shape)
    widths = {g.name: g.width for g in graph.groups}
    curves = _curves({n: [0.01, 0.02, 0.04] for n in widths}, widths)
    plan, _ = plan_to(model, graph, curves, 1.0, _env(shape, layer_macs))
    assert plan == {n: w - Limits(round_to=8).keep(w, 0.75) for n, w in widths.items()}


@pytest.mark.parametrize("layer, shape", [
    (torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), (8, 15, 15)),
    (torch.nn.Conv2d(8, 8, 3, padding="same", groups=8), (8, 7, 9)),
    (torch.nn.Conv2d(8, 16, 5, padding="valid", dilation=2), (8, 20, 20)),
    (torch.nn.Conv1d(4, 6, 3, padding=1), (4, 11)),
    (torch.nn.Linear(12, 5), (12,)),
])
def test_layer_macs_matches_the_counter(layer: torch.nn.Module, shape: tuple[int, ...]) -> None:
    cin = layer.in_features if isinstance(layer, torch.nn.Linear) else layer.in_channels
    cout = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
    counted = model_size(torch.nn.Sequential(layer), shape)["macs"]
    assert layer_macs(layer, cin, cout, shape[1:]) == counted


@pytest.mark.parametrize("priced_by", ["drop threshold", "macs"])
def test_a_pinned_group_keeps_its_width_and_the_plan_still_lands_on_the_goal(priced_by: str) -> None:
    """A recipe's `ratios` pattern pins a group: the planner cuts it there, plans the rest around it, and the
    fill never gives it channels back, even where the analysis says it is the most sensitive."""
    model = create_model("resnet20", num_classes=10, in_channels=1)
    shape = (1, 32, 32)
    graph = ChannelGraph(model, shape)
    widths = {g.name: g.width for g in graph.groups}
    first = next(iter(widths))
    drops = {n: [0.001 * (i % 3), 0.01, 0.05] for i, n in enumerate(widths)}
    drops[first] = [0.5, 0.9, 0.99]  # the analysis would never cut it
    curves = _curves(drops, widths)
    env = _env(shape, layer_macs if priced_by == "macs" else None)
    env.pinned = {first: widths[first] // 2}
    unit = {n: torch.arange(w, dtype=torch.float32) for n, w in widths.items()}
    goal = pruned_size(model, shape, unit, {})["macs"] / 2.3
    plan, _ = plan_to(model, graph, curves, goal, env)
    assert widths[first] - plan[first] == widths[first] // 2
    assert pruned_size(model, shape, unit, plan)["macs"] <= goal
    assert any(cut for name, cut in plan.items() if name != first)


def test_a_measured_cost_that_rises_as_layers_narrow_still_reaches_the_goal() -> None:
    """Timings are not monotone in width (oneDNN steps, noise). Priced raw, a high price would keep layers
    wide and the plan would never reach its size; each width is priced at the cheapest wider one instead."""
    model, shape = _two_convs(), (1, 32, 32)
    graph = ChannelGraph(model, shape)
    widths = {g.name: g.width for g in graph.groups}
    curves = _curves({n: [0.01, 0.02, 0.04] for n in widths}, widths)

    def narrower_is_slower(layer: torch.nn.Module, cin: int, cout: int, spatial: tuple[int, ...]) -> float:
        return 1.0 / (cin * cout)

    unit = {n: torch.arange(w, dtype=torch.float32) for n, w in widths.items()}
    goal = pruned_size(model, shape, unit, {})["macs"] / 1.6
    plan, _ = plan_to(model, graph, curves, goal, _env(shape, narrower_is_slower))
    assert pruned_size(model, shape, unit, plan)["macs"] <= goal
