"""Benchmark: latency of checkpoints against the first one, interleaved in one process, with the ratio of
speedup to MACs reduction (1.0 is what the arithmetic alone would give).

Every model runs on the same input, one forward each in turn, many repeats; medians. Run it on an otherwise
idle machine with torch's default threads (do not set OMP_NUM_THREADS):

    python bench/latency.py runs/cache/vgg16_bn-fmnist.safetensors runs/bench/prune-vgg16/dnnprune-seed0.safetensors \\
        --out runs/bench/latency-vgg16.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

import dnnprune
from dnnprune.checkpoint import meta_of
from dnnprune.latency import compare_models
from dnnprune.metrics import count_macs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+", help="the reference first, then the models to compare")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--runtimes", default="eager",
                        help="comma list of eager (PyTorch as trained), fused (TorchScript-frozen: BatchNorm folded, "
                             "conv + activation fused) and onnxruntime (the ONNX export), each timed for every model")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def rows_for(paths: list[Path], batches: list[int], repeats: int, runtimes: tuple[str, ...] = ("eager",)
             ) -> list[dict[str, Any]]:
    """One row per runtime, batch size and model: median ms, speedup, MACs reduction and their ratio."""
    models = [dnnprune.load(p) for p in paths]
    shape = tuple(meta_of(models[0]).input_shape)
    macs = [sum(count_macs(m, shape).values()) for m in models]
    rows = []
    for runtime, batch in itertools.product(runtimes, batches):
        times = compare_models(models, shape, batch, repeats, runtime=runtime)  # type: ignore[arg-type]
        for path, ms, mac in zip(paths, times, macs):
            speedup, fewer = times[0] / ms, macs[0] / mac
            rows.append({"model": str(path), "runtime": runtime, "batch": batch, "median_ms": ms, "speedup": speedup,
                         "macs": mac, "macs_reduction": fewer, "speedup_per_macs_reduction": speedup / fewer})
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = rows_for(args.checkpoints, [int(b) for b in args.batches.split(",")], args.repeats,
                    tuple(args.runtimes.split(",")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "threads": torch.get_num_threads(),
                                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}, indent=2))
    print(f"threads: {torch.get_num_threads()}")
    print("| model | runtime | batch | median ms | speedup | MACs ↓ | speedup / MACs ↓ |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {Path(r['model']).name} | {r['runtime']} | {r['batch']} | {r['median_ms']:.2f} | {r['speedup']:.2f}x | "
              f"{r['macs_reduction']:.2f}x | {r['speedup_per_macs_reduction']:.2f} |")


if __name__ == "__main__":
    main()
