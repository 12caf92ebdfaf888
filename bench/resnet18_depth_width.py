"""Latency only: a torchvision resnet18 with whole blocks removed and the remaining widths cut, against the
original, to see which depth + width designs keep speed in step with MACs (BENCHMARKS.md, issue 12).

No training: the variants get random weights, since only their shapes matter for time. Each design
is JSON: `remove` (block names, e.g. "layer4.0"; a removed block that changes shape takes the
whole stage's output width with it, so the head reads the last stage left), `mid` (fraction of each
stage's block-internal width kept) and `res` (fraction of each stage's residual width kept), widths
rounded to multiples of 16. All designs are timed interleaved with the original in one process.

    python bench/resnet18_depth_width.py runs/cache/resnet18-import/resnet18.safetensors \\
        '[{"remove": ["layer3.1", "layer4.0", "layer4.1"], "mid": [0.5, 0.5, 0.5, 0.5], "res": [0.75, 0.75, 0.75, 0.75]}]'
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any, Sequence

import torch
from torch import nn

import dnnprune
from dnnprune.checkpoint import meta_of
from dnnprune.latency import compare_models
from dnnprune.metrics import count_macs

STAGE_WIDTHS = {1: 64, 2: 128, 3: 256, 4: 512}


def rounded(width: int, fraction: float) -> int:
    return max(16, round(width * fraction / 16) * 16)


def _conv_like(conv: nn.Conv2d, cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)  # type: ignore[arg-type]


def variant(base: nn.Module, remove: Sequence[str], mid: Sequence[float], res: Sequence[float]) -> nn.Module:
    """The design's shapes on a copy of `base` (BatchNorm statistics randomised so folding is not trivial)."""
    model = copy.deepcopy(base)
    residual = {s: rounded(STAGE_WIDTHS[s], res[s - 1]) for s in STAGE_WIDTHS}
    model.conv1 = _conv_like(model.conv1, model.conv1.in_channels, residual[1])
    model.bn1 = nn.BatchNorm2d(residual[1])
    width = residual[1]
    for stage in STAGE_WIDTHS:
        layer = getattr(model, f"layer{stage}")
        for index, block in enumerate(layer):
            if f"layer{stage}.{index}" in remove:
                layer[index] = nn.Identity()
                continue
            inner = rounded(STAGE_WIDTHS[stage], mid[stage - 1])
            block.conv1, block.bn1 = _conv_like(block.conv1, width, inner), nn.BatchNorm2d(inner)
            block.conv2, block.bn2 = _conv_like(block.conv2, inner, residual[stage]), nn.BatchNorm2d(residual[stage])
            if block.downsample is not None:
                block.downsample[0] = _conv_like(block.downsample[0], width, residual[stage])
                block.downsample[1] = nn.BatchNorm2d(residual[stage])
            width = residual[stage]
    model.fc = nn.Linear(width, model.fc.out_features)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def measure(checkpoint: str, designs: list[dict[str, Any]], repeats: int, batches: Sequence[int] = (64, 1)) -> list[dict[str, Any]]:
    base = dnnprune.load(checkpoint).eval()
    shape = tuple(meta_of(base).input_shape)
    models = [variant(base, d.get("remove", []), d.get("mid", [1] * 4), d.get("res", [1] * 4)) for d in designs]
    base_macs = sum(count_macs(base, shape).values())
    rows = []
    with torch.no_grad():
        for batch in batches:
            times = compare_models([base, *models], shape, batch, repeats=repeats, runtime="fused")
            for design, model, ms in zip(designs, models, times[1:]):
                macs_x = base_macs / sum(count_macs(model, shape).values())
                rows.append({"design": design, "batch": batch, "base_ms": times[0], "ms": ms, "macs_x": macs_x,
                             "speedup": times[0] / ms, "ratio": times[0] / ms / macs_x})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a torchvision resnet18 checkpoint (dnnprune)")
    parser.add_argument("designs", help="JSON list of designs")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    for row in measure(args.checkpoint, json.loads(args.designs), args.repeats):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
