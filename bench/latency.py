"""Benchmark: latency of checkpoints against the first one, interleaved in one process, with the ratio of
speedup to MACs reduction (1.0 is what the arithmetic alone would give).

Every model runs on the same input, one forward each in turn, many repeats; medians. Run it on an otherwise
idle machine with torch's default threads (do not set OMP_NUM_THREADS). How many models share a run moves
the ratios by a few hundredths (caches; on the AMD VM a resnet18 read 0.83-0.88 among 13 models and 0.89-0.94
among 3), so `--pairwise` times each model against the reference alone, two models per run. The same
pair also reads differently from one process to the next (resnet18 on the AMD VM: 0.88-0.90 over six
runs inside one process, 0.80-0.93 over six processes), so `--processes N` repeats the whole
measurement in N fresh processes and reports the median ratio over them, with its range:

    python bench/latency.py runs/cache/vgg16_bn-fmnist.safetensors runs/bench/prune-vgg16/dnnprune-seed0.safetensors \\
        --out runs/bench/latency-vgg16.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
    parser.add_argument("--processes", type=int, default=1,
                        help="repeat the measurement in this many fresh processes, one after another, and report "
                             "the median over them (the ratio moves more between processes than within one)")
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


def over_processes(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per model, runtime and batch from several processes' rows: medians of the times and of
    the ratio over the processes, with each process's ratio and the range kept."""
    rows = []
    for readings in zip(*runs):
        first = readings[0]
        ratios = [r["speedup_per_macs_reduction"] for r in readings]
        median_ms, reference_ms = (statistics.median(r[key] for r in readings) for key in ("median_ms", "reference_ms"))
        rows.append({**first, "median_ms": median_ms, "reference_ms": reference_ms,
                     "speedup": statistics.median(r["speedup"] for r in readings),
                     "speedup_per_macs_reduction": statistics.median(ratios), "ratio_per_process": ratios,
                     "ratio_range": [min(ratios), max(ratios)]})
    return rows


def rows_from_processes(argv: list[str], count: int, folder: Path) -> list[dict[str, Any]]:
    """Run this script `count` times in fresh processes, one after another (never side by side, which
    would time the contention), and combine their rows."""
    runs = []
    for index in range(count):
        out = folder / f"process{index}.json"
        done = subprocess.run([sys.executable, __file__, *argv, "--processes", "1", "--out", str(out)],
                              stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            raise SystemExit(f"measuring process {index + 1} of {count} failed (exit {done.returncode}); its error is above")
        runs.append(json.loads(out.read_text())["rows"])
    return over_processes(runs)


def without_option(argv: list[str], *names: str) -> list[str]:
    """argv without the given options and their values (the child processes get their own)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in names:
            skip = True
        elif not any(item.startswith(f"{name}=") for name in names):
            kept.append(item)
    return kept


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.processes > 1:
        with tempfile.TemporaryDirectory() as folder:
            rows = rows_from_processes(without_option(list(sys.argv[1:] if argv is None else argv), "--processes", "--out"),
                                       args.processes, Path(folder))
    else:
        rows = rows_for(args.checkpoints, [int(b) for b in args.batches.split(",")], args.repeats,
                        tuple(args.runtimes.split(",")), pairwise=args.pairwise)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    interleaved = 2 if args.pairwise else len(args.checkpoints)
    atomic_write_bytes(args.out, json.dumps({"command": " ".join(sys.argv), "threads": torch.get_num_threads(),
                                             "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                                             "models_per_run": interleaved, "processes": args.processes,
                                             "rows": rows}, indent=2).encode())
    print(f"threads: {torch.get_num_threads()}, models interleaved per run: {interleaved}, processes: {args.processes}")
    print("| model | runtime | batch | median ms | speedup | MACs ↓ | speedup / MACs ↓ |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        spread = " ({:.2f}-{:.2f})".format(*r["ratio_range"]) if "ratio_range" in r else ""
        print(f"| {Path(r['model']).name} | {r['runtime']} | {r['batch']} | {r['median_ms']:.2f} | {r['speedup']:.2f}x | "
              f"{r['macs_reduction']:.2f}x | {r['speedup_per_macs_reduction']:.2f}{spread} |")


if __name__ == "__main__":
    main()
