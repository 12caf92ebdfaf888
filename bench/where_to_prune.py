"""Which layers' MACs buy time? The cached VGG-16 baseline (no training: latency only), pruned one-shot in
different layer groups, and the accuracy-aware model of the VGG-16 benchmark (runs/bench/vgg-idle), timed
interleaved against the original on the fused and eager runtimes.  Prints one JSON line per model, runtime and batch size."""
import argparse
import copy
import json
from pathlib import Path

import torch

import dnnprune
from dnnprune.latency import compare_models
from dnnprune.pruning.command import prune
from dnnprune.pruning.structured import model_size
from dnnprune.recipe import PruneSection

SHAPE = (1, 32, 32)
GROUPS = {"32px": ["features.0", "features.3"], "16px": ["features.7", "features.10"],
          "8px": ["features.14", "features.17", "features.20"], "4px": ["features.24", "features.27", "features.30"],
          "2px": ["features.34", "features.37", "features.40"]}
CONFIGS = {
    "uniform": {n: 0.45 for g in GROUPS.values() for n in g},
    "mid (16-8 px)": {n: 0.75 for g in ("16px", "8px") for n in GROUPS[g]},
    "mid+4px": {n: 0.6 for g in ("16px", "8px", "4px") for n in GROUPS[g]},
    "early+mid": {n: 0.6 for g in ("32px", "16px", "8px") for n in GROUPS[g]},
    "late (4-2 px)": {n: 0.85 for g in ("4px", "2px") for n in GROUPS[g]},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", type=Path, default=Path("runs/cache/vgg16_bn-fmnist.safetensors"))
    parser.add_argument("--pruned", type=Path, default=Path("runs/bench/vgg-idle/compare/dnnprune-seed0.safetensors"),
                        help="an accuracy-aware VGG-16: timed as it is and with its plan's widths rounded to 16")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    base = dnnprune.load(args.baseline).eval()
    aware = dnnprune.load(args.pruned).eval()
    configs: dict[str, dict[str, float] | None] = {"accuracy-aware model as pruned": None, **CONFIGS}
    configs["accuracy-aware plan, widths to 16"] = {
        name: 1 - aware.get_submodule(name).out_channels / base.get_submodule(name).out_channels
        for group in GROUPS.values() for name in group}
    base_macs = model_size(base, SHAPE)["macs"]
    for name, ratios in configs.items():
        model = aware if ratios is None else prune(copy.deepcopy(base), PruneSection(ratios=ratios, round_to=16,
                                                                                      evaluate=False))[0]
        macs = base_macs / model_size(model, SHAPE)["macs"]
        for runtime in ("fused", "eager"):
            for batch in (64, 1):
                before, after = compare_models([base, model], SHAPE, batch, args.repeats, runtime=runtime)
                print(json.dumps({"config": name, "runtime": runtime, "batch": batch, "macs_x": macs,
                                  "speedup": before / after, "ratio": before / after / macs}), flush=True)
    print("threads", torch.get_num_threads())


if __name__ == "__main__":
    main()
