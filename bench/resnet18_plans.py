"""Latency only: the resnet18 chain's channel-stage plans under other settings, from saved analyses.

The increments planner's widths depend only on the analysis curves and the limits, not on the
fine-tunes, so each seed's plan can be rebuilt from its saved analysis of the depth-pruned model
(`depth-seedS.analysis.json`, written by `bench/prune_compare.py --depth-recipe`) without training.
Each variant (JSON: name -> {round_to, max_ratio, min_channels, plan_cost: none|macs|latency, pins: {group: width}}) is
planned in the recipe's increments (the last ones towards the target, counted from the original),
given L1-chosen channels of random weights, and timed on the fused runtime at batch 64, interleaved
with the original in one process, for `--rounds` rounds (BENCHMARKS.md, issue 12).

    python bench/resnet18_plans.py runs/cache/resnet18-import/resnet18.safetensors \\
        runs/bench/r18-fill-s0/depth-seed0.analysis.json --remove layer4.1,layer4.0,layer3.1 \\
        '{"16": {"round_to": 16}, "16-ms": {"round_to": 16, "plan_cost": "latency"}}'
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch.nn as nn

import dnnprune
from dnnprune.inference import runner
from dnnprune.latency import LayerTable, interleaved_ms, random_input
from dnnprune.pruning.increments import Curves, IncrementEnvironment, plan_to
from dnnprune.pruning.structured import LayerCost, Limits, apply_plan, layer_macs, model_size, score_groups
from dnnprune.surgery import ChannelGraph
from dnnprune.tasks import TaskSpec, make_task

SHAPE = (1, 32, 32)


def without_blocks(model: nn.Module, names: list[str]) -> nn.Module:
    """The depth stage's result: a block that changes shape keeps its downsample path, others become identity."""
    stripped = copy.deepcopy(model)
    for name in names:
        stage, index = name.split(".")
        block = getattr(stripped, stage)[int(index)]
        getattr(stripped, stage)[int(index)] = block.downsample if block.downsample is not None else nn.Identity()
    return stripped


def planned(model: nn.Module, curves: Curves, settings: dict[str, Any], goal: float, increments: int,
            table: LayerTable | None) -> nn.Module:
    """The model after the planner's increments towards `goal` MACs (random weights, L1 channel choice)."""
    cost = settings.pop("plan_cost", "none")
    pins = {name: int(width) for name, width in settings.pop("pins", {}).items()}
    layer_cost: LayerCost | None = layer_macs if cost == "macs" else table.layer_ms if cost == "latency" else None
    limits = Limits(**{"max_ratio": 0.9, **settings})
    env = IncrementEnvironment(input_shape=SHAPE, limits=limits, metric="macs", factor=0.0, max_drop=0.0,
                               task=make_task(TaskSpec()), score=lambda m, g: {}, evaluate=lambda m: None,  # type: ignore[arg-type,return-value]
                               finetune=lambda m, label: 0, analyze=None, layer_cost=layer_cost,
                               pinned=pins)
    start = model_size(model, SHAPE)["macs"]
    for index in range(1, increments + 1):
        graph = ChannelGraph(model, SHAPE)
        plan, _ = plan_to(model, graph, curves, max(start * (goal / start) ** (index / increments), goal), env)
        apply_plan(graph, score_groups(graph, "l1"), plan)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", type=Path)
    parser.add_argument("analyses", type=Path, nargs="+", help="depth-seedS.analysis.json files, one per seed")
    parser.add_argument("--variants", required=True, help="JSON: name -> planner settings")
    parser.add_argument("--remove", default="layer4.1,layer4.0,layer3.1", help="the blocks the depth stage removed")
    parser.add_argument("--target", type=float, default=3.78, help="MACs reduction, counted from the original")
    parser.add_argument("--increments", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    original = dnnprune.load(args.original).eval()
    base_macs = model_size(original, SHAPE)["macs"]
    table = LayerTable(64, 15, runtime="fused")
    models: dict[str, nn.Module] = {}
    for path in args.analyses:
        curves = Curves.from_report(json.loads(path.read_text()), make_task(TaskSpec()))
        for name, settings in json.loads(args.variants).items():
            model = planned(without_blocks(original, args.remove.split(",")), curves, dict(settings),
                            base_macs / args.target, args.increments, table)
            key = f"{path.stem.split('.')[0]}:{name}"
            models[key] = model
            widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
            print(json.dumps({"model": key, "macs_reduction": round(base_macs / model_size(model, SHAPE)["macs"], 3),
                              "conv_widths": widths}), flush=True)
    table.save()
    sample = random_input(SHAPE, 64)
    runs = [runner(original, sample, "fused")] + [runner(m, sample, "fused") for m in models.values()]
    for round_index in range(args.rounds):
        times = interleaved_ms(runs, args.repeats)
        ratios = {key: round(times[0] / ms / (base_macs / model_size(m, SHAPE)["macs"]), 3)
                  for (key, m), ms in zip(models.items(), times[1:])}
        print(json.dumps({"round": round_index, "original_ms": round(times[0], 2), "b64_ratio": ratios}), flush=True)


if __name__ == "__main__":
    main()
