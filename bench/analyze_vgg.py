"""Benchmark: `dnnprune analyze` on CIFAR-style VGG-16 (BN) trained on Fashion-MNIST.

Goals (issue 4): 13 conv layers x 9 ratios on 2,000 validation samples in under 5 minutes on the
2-core CPU; the layer order from those 2,000 samples agrees with the order from the whole validation
split (Spearman rank correlation of per-layer sensitivity >= 0.9); time linear in layers x ratios
across VGG-11/16/19.

    python bench/analyze_vgg.py [CKPT] [--samples 2000] [--nproc 1] [--threads N] [--skip-full]
                                [--linearity] [--ablation] [--out runs/bench/analyze]

* main run: the real command (`python -m dnnprune analyze`, under torchrun with --nproc > 1), timed
  from the outside (process start, data loading and writing included);
* --skip-full leaves out the whole-validation-split run (3x the work) and so the Spearman check;
* --linearity times untrained vgg11_bn / vgg16_bn / vgg19_bn on the same 2,000 samples (timing does
  not depend on the weights; their accuracies are meaningless and not reported);
* --ablation measures, in this process, what each speed-up buys on a small grid of the checkpoint.

Prints a markdown table and writes OUT/analyze_vgg.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dnnprune.analysis import spearman  # noqa: E402  (after the sys.path line above)

RATIOS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"
LAYERS = "type:Conv2d"  # the 13 conv layers (the classifier's hidden Linear is a 14th group)
GOAL_SECONDS = 300.0
GOAL_SPEARMAN = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, default=ROOT / "runs/cache/vgg16_bn-fmnist.safetensors")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--ratios", default=RATIOS)
    parser.add_argument("--layers", default=LAYERS, help="layer pattern (default: the conv layers)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun) for every timed run")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per process [torch's default]")
    parser.add_argument("--skip-full", action="store_true", help="skip the whole-val-split run (and Spearman)")
    parser.add_argument("--linearity", action="store_true", help="also time untrained VGG-11/16/19")
    parser.add_argument("--ablation", action="store_true", help="also measure each speed-up on a small grid")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench/analyze")
    return parser.parse_args(argv)


def run_analyze(checkpoint: Path, output: Path, args: argparse.Namespace, *, samples: int | None) -> dict[str, Any]:
    """One `dnnprune analyze` process (or torchrun group); returns its report plus the outside wall time."""
    recipe = output.with_suffix(".recipe.yaml")
    recipe.write_text("analyze:\n  samples: null\n" if samples is None else f"analyze:\n  samples: {samples}\n")
    command = ["-m", "dnnprune", "analyze", str(checkpoint), "-r", str(recipe), "--ratios", args.ratios,
               "--layers", args.layers, "-o", str(output), "--force"]
    if args.nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc), *command]
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command], env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"analyze failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    report = json.loads(output.read_text())
    report["bench_wall_seconds"] = wall
    return report


def untrained_checkpoint(arch: str, folder: Path) -> Path:
    from dnnprune.checkpoint import CheckpointMeta, attach_meta, save
    from dnnprune.data import DATASETS, default_spec
    from dnnprune.models import create_model

    path = folder / f"{arch}-untrained.safetensors"
    if not path.exists():
        spec = default_spec("fashion-mnist")
        args = {"num_classes": 10, "in_channels": 1}
        meta = CheckpointMeta(arch=arch, arch_args=args, input_shape=(1, 32, 32), mean=spec.mean, std=spec.std,
                              dataset="fashion-mnist", classes=list(DATASETS["fashion-mnist"].classes))
        save(attach_meta(create_model(arch, **args), meta), path)
    return path


def ablation(checkpoint: Path, samples: int) -> list[dict[str, Any]]:
    """Each speed-up switched on in turn, in this process, on 4 layers x 2 ratios."""
    import torch

    import dnnprune
    from dnnprune.analysis import analyze
    from dnnprune.distributed import tune_malloc
    from dnnprune.loaders import split_dataset
    from dnnprune.recipe import AnalyzeSection, DataSection

    model = dnnprune.load(checkpoint)
    meta = dnnprune.meta_of(model)
    data = split_dataset(meta, DataSection(), "val", samples, 0)
    layers = ["features.0", "features.10", "features.20", "features.30"]
    steps = [("naive: fresh copy + re-trace per cell, NCHW", "naive", False, False),
             ("prune & restore one copy", "restore", False, False),
             ("+ channels-last", "restore", True, False),
             ("+ cached activations before the pruned layer", "cache", True, False),
             ("+ channel selection after it", "fast", True, False),
             ("+ glibc malloc tuning (as the CLI does)", "fast", True, False),
             ("+ Winograd F(2x2,3x3) on maps <= 8x8", "fast", True, True)]
    rows, reference = [], None
    for label, strategy, channels_last, winograd in steps:
        if label.startswith("+ glibc"):
            tune_malloc()
        config = AnalyzeSection(ratios=[0.3, 0.7], layers=layers, channels_last=channels_last, samples=samples,
                                winograd=winograd)
        start = time.perf_counter()
        _, report = analyze(model, config, val_data=data, strategy=strategy)  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
        cells = [(c.metrics()["top1"], c.metrics()["loss"]) for layer in report.layers for c in layer.cells]
        reference = reference or cells
        rows.append({"step": label, "seconds": seconds, "speedup": rows[0]["seconds"] / seconds if rows else 1.0,
                     "same_top1": [c[0] for c in cells] == [c[0] for c in reference],
                     "max_loss_difference": max(abs(c[1] - r[1]) for c, r in zip(cells, reference)),
                     "threads": torch.get_num_threads()})
        print(f"  {label}: {seconds:.1f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.checkpoint.exists():
        sys.exit(f"{args.checkpoint} not found; train it first (make vgg16-fmnist or dnnprune train vgg16_bn "
                 "-r recipes/vgg16-fmnist.yaml -o runs/cache/vgg16_bn-fmnist.safetensors)")
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "samples": args.samples, "ratios": args.ratios,
                              "layers": args.layers, "nproc": args.nproc, "threads": args.threads}
    print(f"analyze {args.checkpoint.name}: {args.samples} val samples, {args.nproc} process(es)", flush=True)
    main_run = run_analyze(args.checkpoint, args.out / "vgg16-subset.analysis.json", args, samples=args.samples)
    result["main"] = _summary(main_run)
    if not args.skip_full:
        print("analyze on the whole validation split", flush=True)
        full = run_analyze(args.checkpoint, args.out / "vgg16-fullval.analysis.json", args, samples=None)
        result["full"] = _summary(full)
        result["spearman"] = _agreement(main_run, full)
    if args.linearity:
        result["linearity"] = []
        for arch in ("vgg11_bn", "vgg16_bn", "vgg19_bn"):
            print(f"linearity: {arch} (untrained)", flush=True)
            report = run_analyze(untrained_checkpoint(arch, args.out), args.out / f"{arch}.analysis.json", args,
                                 samples=args.samples)
            result["linearity"].append({"arch": arch, **_summary(report)})
    if args.ablation:
        print("ablation (in this process, 4 layers x 2 ratios)", flush=True)
        result["ablation"] = ablation(args.checkpoint, min(args.samples, 1000))
    (args.out / "analyze_vgg.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwritten: {args.out / 'analyze_vgg.json'}")


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    timing = report["timing"]
    return {"layers": len(report["layers"]), "ratios": len(report["ratios"]), "cells": timing["cells"],
            "samples": report["samples"], "wall_seconds": report["bench_wall_seconds"],
            "analysis_seconds": timing["seconds"], "seconds_per_cell": report["bench_wall_seconds"] / timing["cells"],
            "work_gmacs": timing.get("work_gmacs"), "processes": timing["processes"],
            "threads_per_process": timing.get("threads_per_process"),
            "baseline": report["baseline"].get(report.get("primary_metric", "top1")),
            "order": report["order"], "sensitivity": {l["name"]: l["sensitivity"] for l in report["layers"]},
            "routes": timing.get("evaluations_by_route")}


def _agreement(subset: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    names = [layer["name"] for layer in subset["layers"]]
    a = {l["name"]: l["sensitivity"] for l in subset["layers"]}
    b = {l["name"]: l["sensitivity"] for l in full["layers"]}
    rho = spearman([a[n] for n in names], [b[n] for n in names]) if len(names) > 1 else float("nan")
    return {"rho": rho, "goal": GOAL_SPEARMAN, "met": rho >= GOAL_SPEARMAN,
            "same_order": subset["order"] == full["order"]}


def markdown(result: dict[str, Any]) -> str:
    main = result["main"]
    lines = ["| run | layers x ratios | samples | processes | wall s | s / cell | analysis s | GMAC evaluated | goal |",
             "|---|---|---|---|---|---|---|---|---|"]

    def row(name: str, s: dict[str, Any], goal: str) -> str:
        work = f"{s['work_gmacs']:,.0f}" if s.get("work_gmacs") else "-"
        return (f"| {name} | {s['layers']} x {s['ratios']} = {s['cells']} | {s['samples']} | {s['processes']} | "
                f"{s['wall_seconds']:.0f} | {s['seconds_per_cell']:.2f} | {s['analysis_seconds']:.0f} | {work} | "
                f"{goal} |")

    verdict = "met" if main["wall_seconds"] < GOAL_SECONDS else "NOT met"
    lines.append(row("VGG-16 trained, subset", main, f"< {GOAL_SECONDS:.0f} s: {verdict}"))
    if "full" in result:
        sp = result["spearman"]
        lines.append(row("VGG-16 trained, whole val split", result["full"],
                         f"Spearman {sp['rho']:.3f} (>= {GOAL_SPEARMAN}: {'met' if sp['met'] else 'NOT met'})"))
    for entry in result.get("linearity", []):
        per_gmac = entry["analysis_seconds"] / entry["work_gmacs"] if entry.get("work_gmacs") else float("nan")
        lines.append(row(f"{entry['arch']} untrained", entry, f"{per_gmac * 1000:.1f} analysis s per TMAC"))
    text = "\n".join(lines)
    if "ablation" in result:
        text += ("\n\n| speed-up (4 layers x 2 ratios, in-process) | seconds | x vs naive | same top-1 "
                 "| max loss diff |\n|---|---|---|---|---|\n")
        text += "\n".join(f"| {r['step']} | {r['seconds']:.1f} | {r['speedup']:.2f} | {r['same_top1']} | "
                          f"{r['max_loss_difference']:.1e} |" for r in result["ablation"])
    return text


if __name__ == "__main__":
    main()
