"""bench/resnet18_plans.py rebuilds the chain's depth stage and plans its channel stage without training."""

from __future__ import annotations

import torch
import torchvision

from dnnprune.pruning.increments import Curves
from dnnprune.pruning.structured import model_size
from dnnprune.surgery import ChannelGraph
from tests.conftest import bench_module

SHAPE = (1, 32, 32)


def _resnet18() -> torch.nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model.eval()


def test_removed_blocks_leave_the_downsample_path_or_nothing() -> None:
    plans = bench_module("resnet18_plans.py")
    stripped = plans.without_blocks(_resnet18(), ["layer4.1", "layer4.0", "layer1.1"])
    assert isinstance(stripped.layer4[1], torch.nn.Identity) and isinstance(stripped.layer1[1], torch.nn.Identity)
    assert isinstance(stripped.layer4[0][0], torch.nn.Conv2d) and stripped.layer4[0][0].kernel_size == (1, 1)
    assert stripped(torch.zeros(2, *SHAPE)).shape == (2, 10)


def test_each_setting_plans_the_stage_down_to_its_goal() -> None:
    plans = bench_module("resnet18_plans.py")
    model = plans.without_blocks(_resnet18(), ["layer4.1", "layer4.0", "layer3.1"])
    widths = {g.name: g.width for g in ChannelGraph(model, SHAPE).groups}
    ratios = [0.0, 0.25, 0.5, 0.75, 0.9]
    curves = Curves({n: ratios for n in widths}, {n: [0.0, 0.001 * i, 0.01, 0.03, 0.08] for i, n in enumerate(widths)},
                    widths)
    goal = model_size(model, SHAPE)["macs"] / 2.0
    for settings in ({"round_to": 16}, {"round_to": 32, "plan_cost": "macs"}):
        planned = plans.planned(plans.copy.deepcopy(model), curves, dict(settings), goal, 2, table=None)
        assert model_size(planned, SHAPE)["macs"] <= goal
        assert all(m.out_channels % settings["round_to"] == 0 for m in planned.modules()
                   if isinstance(m, torch.nn.Conv2d) and m.out_channels != 10)
