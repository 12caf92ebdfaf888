"""Where does a pruned torchvision resnet18 lose speed per MAC? Latency only (no training).

Times each part (stem, the eight blocks, head) of the baseline and of a pruned model alone, on its own
input, interleaved in one process on the fused runtime; then the whole pruned model with its
narrowest blocks replaced by their identity shortcut (what depth pruning would remove). Prints one
JSON line per part or variant and batch size.

    python bench/resnet18_parts.py runs/bench/r18-round16/dnnprune-seed0.safetensors --repeats 30
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn as nn

import dnnprune
from dnnprune.inference import runner
from dnnprune.latency import compare_models, interleaved_ms, random_input
from dnnprune.pruning.structured import model_size

SHAPE = (1, 32, 32)
BLOCKS = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
VARIANTS = {"as pruned": [], "without layer4.1": ["layer4.1"], "without layer4.1, layer3.1": ["layer4.1", "layer3.1"],
            "without every second block": ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]}


def parts(model: nn.Module) -> dict[str, nn.Module]:
    """The network cut where shapes are plain tensors: stem, each residual block, head."""
    blocks = {name: getattr(model, name.split(".")[0])[int(name.split(".")[1])] for name in BLOCKS}
    return {"stem": nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool), **blocks,
            "head": nn.Sequential(model.avgpool, nn.Flatten(), model.fc)}


def part_inputs(model: nn.Module) -> dict[str, tuple[int, ...]]:
    shapes, x = {}, torch.zeros(1, *SHAPE)
    with torch.no_grad():
        for name, part in parts(model).items():
            shapes[name] = tuple(x.shape[1:])
            x = part(x)
    return shapes


def time_parts(base: nn.Module, pruned: nn.Module, batch: int, repeats: int) -> None:
    base_parts, pruned_parts = parts(base), parts(pruned)
    base_in, pruned_in = part_inputs(base), part_inputs(pruned)
    for name in base_parts:
        runtime = "eager" if name == "head" else "fused"  # the head is a flatten and one Linear
        runs = [runner(base_parts[name], random_input(base_in[name], batch), runtime),
                runner(pruned_parts[name], random_input(pruned_in[name], batch), runtime)]
        base_ms, pruned_ms = interleaved_ms(runs, repeats)
        base_macs = model_size(base_parts[name], base_in[name])["macs"]
        pruned_macs = model_size(pruned_parts[name], pruned_in[name])["macs"]
        print(json.dumps({"batch": batch, "part": name, "base_ms": round(base_ms, 3), "pruned_ms": round(pruned_ms, 3),
                          "base_macs": base_macs, "pruned_macs": pruned_macs}), flush=True)


def without(model: nn.Module, blocks: list[str]) -> nn.Module:
    """A copy with the given non-downsampling blocks replaced by identity (latency only: not retrained)."""
    stripped = copy.deepcopy(model)
    for name in blocks:
        layer, index = name.split(".")
        getattr(stripped, layer)[int(index)] = nn.Identity()
    return stripped


def time_variants(base: nn.Module, pruned: nn.Module, repeats: int) -> None:
    base_macs = model_size(base, SHAPE)["macs"]
    for name, blocks in VARIANTS.items():
        model = without(pruned, blocks)
        macs = base_macs / model_size(model, SHAPE)["macs"]
        for batch in (64, 1):
            before, after = compare_models([base, model], SHAPE, batch, repeats, runtime="fused")
            print(json.dumps({"variant": name, "batch": batch, "macs_x": round(macs, 3), "speedup": round(before / after, 3),
                              "ratio": round(before / after / macs, 3)}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pruned", type=Path)
    parser.add_argument("--baseline", type=Path, default=Path("runs/cache/resnet18-import/resnet18.safetensors"))
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    base, pruned = dnnprune.load(args.baseline).eval(), dnnprune.load(args.pruned).eval()
    for batch in (64, 1):
        time_parts(base, pruned, batch, args.repeats)
    time_variants(base, pruned, args.repeats)
    print(json.dumps({"threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
