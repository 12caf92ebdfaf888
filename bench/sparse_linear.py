"""Benchmark: does unstructured sparsity save CPU time? Dense F.linear against torch.sparse CSR.

For a few Linear shapes (VGG-16's CIFAR classifier 512x512, AlexNet-style 4096x4096 and 4096x9216)
and densities, magnitude-pruned random weights are timed dense and as CSR, interleaved in one process
(medians of many repeats), at batch 1 and 64. `double-prune --sparse-execution` uses the same
measurement on a real model and swaps in CSR only where it won.

    OMP_NUM_THREADS=1 python bench/sparse_linear.py --out runs/bench/sparse-linear.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from dnnprune.sparse_exec import time_layer


def pruned_linear(rows: int, cols: int, density: float, seed: int = 0) -> nn.Linear:
    """A Linear layer with the smallest-magnitude (1 - density) of its weights set to zero."""
    torch.manual_seed(seed)
    layer = nn.Linear(cols, rows)
    with torch.no_grad():
        weight = layer.weight
        keep = max(1, round(density * weight.numel()))
        threshold = weight.abs().flatten().kthvalue(weight.numel() - keep + 1).values
        weight.mul_((weight.abs() >= threshold).float())
    return layer.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", default="0.02,0.05,0.1,0.2,0.3,0.5")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/sparse-linear.json"))
    args = parser.parse_args(argv)
    rows = []
    print("| shape (out x in) | density | batch | dense ms | CSR ms | CSR speedup |\n|---|---:|---:|---:|---:|---:|")
    for out_features, in_features in ((512, 512), (4096, 4096), (4096, 9216)):
        for density in (float(d) for d in args.densities.split(",")):
            layer = pruned_linear(out_features, in_features, density)
            for batch in (int(b) for b in args.batches.split(",")):
                timing = time_layer(layer, batch, args.repeats)
                rows.append({"shape": [out_features, in_features], "density": density, "batch": batch, **timing})
                print(f"| {out_features}x{in_features} | {density:.2f} | {batch} | {timing['dense_ms']:.3f} | "
                      f"{timing['sparse_ms']:.3f} | {timing['speedup']:.2f}x |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "threads": torch.get_num_threads(),
                                    "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
