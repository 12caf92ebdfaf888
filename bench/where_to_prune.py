"""Which layers' MACs buy time? The cached VGG-16 baseline (no training: latency only), pruned one-shot in
different layer groups, and the accuracy-aware model of the VGG-16 benchmark (runs/bench/vgg-idle), timed
interleaved against the original on the fused and eager runtimes.  Usage: python bench/where_to_prune.py [REPEATS]"""
import copy
import json
import sys

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
base = dnnprune.load("runs/cache/vgg16_bn-fmnist.safetensors").eval()
aware = dnnprune.load("runs/bench/vgg-idle/compare/dnnprune-seed0.safetensors").eval()
CONFIGS["accuracy-aware plan, widths to 16"] = {
    name: 1 - aware.get_submodule(name).out_channels / base.get_submodule(name).out_channels
    for g in GROUPS.values() for name in g}
base_macs = model_size(base, SHAPE)["macs"]
repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 30
rows = []
for name, ratios in [("accuracy-aware model as pruned", None), *CONFIGS.items()]:
    model = aware if ratios is None else prune(copy.deepcopy(base), PruneSection(ratios=ratios, round_to=16,
                                                                                  evaluate=False))[0]
    macs = base_macs / model_size(model, SHAPE)["macs"]
    for runtime in ("fused", "eager"):
        for batch in (64, 1):
            before, after = compare_models([base, model], SHAPE, batch, repeats, runtime=runtime)
            row = {"config": name, "runtime": runtime, "batch": batch, "macs_x": macs, "speedup": before / after,
                   "ratio": before / after / macs}
            rows.append(row)
            print(json.dumps(row), flush=True)
print("threads", torch.get_num_threads())
