"""Benchmark: latency of checkpoints against the first one, interleaved in one process, with the ratio of
speedup to MACs reduction (1.0 is what the arithmetic alone would give).

Every model runs on the same input, one forward each in turn, many repeats; medians. Run it on an otherwise
idle machine with torch's default threads (do not set OMP_NUM_THREADS). How many models share a run moves
the ratios by a few hundredths (caches; on the AMD VM a resnet18 read 0.83-0.88 among 13 models and 0.89-0.94
among 3), so `--pairwise` times each model against the reference alone, two models per run:

    python bench/latency.py runs/cache/vgg16_bn-fmnist.safetensors runs/bench/prune-vgg16/dnnprune-seed0.safetensors \\
        --out runs/bench/latency-vgg16.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

import dnnprune
from dnnprune.checkpoint import atomic_write_bytes, meta_of
from dnnprune.inference import runner
from dnnprune.latency import compare_models, interleaved_ms, random_input
from dnnprune.metrics import count_macs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+", help="the reference first, then the models to compare")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--runtimes", default="eager",
                        help="comma list of eager (PyTorch as trained), fused (TorchScript-frozen: BatchNorm folded, "
                             "oneDNN layouts kept) and onnxruntime (the ONNX export), each timed for every model")
    parser.add_argument("--pairwise", action="store_true",
                        help="time each model interleaved with the reference alone, not all models in one run")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def rows_for(paths: list[Path], batches: list[int], repeats: int, runtimes: tuple[str, ...] = ("eager",),
             pairwise: bool = False) -> list[dict[str, Any]]:
    """One row per runtime, batch size and model: median ms, the reference's median ms in the same run,
    speedup, MACs reduction and their ratio."""
    models = [dnnprune.load(p) for p in paths]
    shape = tuple(meta_of(models[0]).input_shape)
    macs = [sum(count_macs(m, shape).values()) for m in models]
    rows = []
    for runtime, batch in itertools.product(runtimes, batches):
        pairs = timed_pairs(models, shape, batch, repeats, runtime, pairwise)
        for path, (reference_ms, ms), mac in zip(paths, pairs, macs):
            speedup, fewer = reference_ms / ms, macs[0] / mac
            rows.append({"model": str(path), "runtime": runtime, "batch": batch, "median_ms": ms,
                         "reference_ms": reference_ms, "speedup": speedup, "macs": mac, "macs_reduction": fewer,
                         "speedup_per_macs_reduction": speedup / fewer})
    return rows


def timed_pairs(models: list[Any], shape: tuple[int, ...], batch: int, repeats: int, runtime: str,
                pairwise: bool) -> list[tuple[float, float]]:
    """(reference ms, model ms) per model: all models in one interleaved run, or each with the reference alone."""
    if not pairwise:
        times = compare_models(models, shape, batch, repeats, runtime=runtime)  # type: ignore[arg-type]
        return [(times[0], ms) for ms in times]
    sample = random_input(shape, batch)
    reference = runner(models[0], sample, runtime)  # type: ignore[arg-type]
    pairs = [tuple(interleaved_ms([reference, runner(m, sample, runtime)], repeats)) for m in models[1:]]  # type: ignore[arg-type]
    reference_ms = statistics.median(ref for ref, _ in pairs)
    return [(reference_ms, reference_ms), *pairs]  # type: ignore[list-item]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = rows_for(args.checkpoints, [int(b) for b in args.batches.split(",")], args.repeats,
                    tuple(args.runtimes.split(",")), pairwise=args.pairwise)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    interleaved = 2 if args.pairwise else len(args.checkpoints)
    atomic_write_bytes(args.out, json.dumps({"command": " ".join(sys.argv), "threads": torch.get_num_threads(),
                                             "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                                             "models_per_run": interleaved, "rows": rows}, indent=2).encode())
    print(f"threads: {torch.get_num_threads()}, models interleaved per run: {interleaved}")
    print("| model | runtime | batch | median ms | speedup | MACs ↓ | speedup / MACs ↓ |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {Path(r['model']).name} | {r['runtime']} | {r['batch']} | {r['median_ms']:.2f} | {r['speedup']:.2f}x | "
              f"{r['macs_reduction']:.2f}x | {r['speedup_per_macs_reduction']:.2f} |")


if __name__ == "__main__":
    main()
