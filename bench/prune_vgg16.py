"""Benchmark: VGG-16 (BN, CIFAR-style) on Fashion-MNIST pruned to >= 3x fewer MACs, two ways.

(a) dnnprune: sensitivity-ordered pruning, accuracy-aware or one-shot per the recipe (default
    recipes/prune-vgg16-fmnist.yaml; recipes/prune-vgg16-oneshot.yaml for one-shot) + an
    `analyze` report), then its final fine-tune;
(b) Torch-Pruning's own MagnitudePruner, uniform group-L1, its ratio bisected until MACs are at least
    as far down as (a) reached (and at least the target), then the same fine-tune budget: by default
    as many optimizer steps as (a) used in total (its per-step fine-tunes plus the final one), same lr.

Then test top-1 and CPU latency at batch 64 for the baseline and both pruned models, a JSON file and a
markdown table. Goals: >= 3x fewer MACs, <= 1.0 point test top-1 drop, latency speedup >= 0.8 x the
MACs reduction. Only this script (bench code) imports torch_pruning outside dnnprune.surgery.

    python bench/prune_vgg16.py [CKPT] --analysis runs/cache/vgg16_bn-fmnist.analysis.json \\
        [--step-steps 30] [--final-steps 400] [--lr 0.01] [--step 0.2] [--device auto] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

import dnnprune
from dnnprune.checkpoint import meta_of
from dnnprune.loaders import eval_loader, train_loader
from dnnprune.metrics import count_macs, count_parameters, measure_latency
from dnnprune.pruning import prune
from dnnprune.recipe import Recipe, load_recipe
from dnnprune.surgery import output_layers
from dnnprune.training import evaluate, progress_bar, resolve_device, train

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, default=ROOT / "runs/cache/vgg16_bn-fmnist.safetensors")
    parser.add_argument("--analysis", type=Path, default=ROOT / "runs/cache/vgg16_bn-fmnist.analysis.json",
                        help="report of `dnnprune analyze CKPT` (sensitivity order)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes/prune-vgg16-fmnist.yaml")
    parser.add_argument("--target", type=float, default=None, help="MACs reduction factor [recipe: 3]")
    parser.add_argument("--step", type=float, default=None, help="ratio added per accuracy-aware step [recipe]")
    parser.add_argument("--max-drop", type=float, default=None, help="val top-1 drop allowed per step [recipe]")
    parser.add_argument("--val-samples", type=int, default=None, help="val subset for accuracy-aware steps [recipe]")
    parser.add_argument("--step-steps", type=int, default=None, help="fine-tune steps after each pruning step [recipe]")
    parser.add_argument("--final-steps", type=int, default=None, help="final fine-tune steps [recipe]")
    parser.add_argument("--lr", type=float, default=None, help="fine-tune learning rate (both phases) [recipe]")
    parser.add_argument("--tp-budget", choices=["total", "final"], default="total",
                        help="Torch-Pruning's fine-tune steps: all the steps ours used (total) or only its final fine-tune")
    parser.add_argument("--test-samples", type=int, default=None, help="test on a stratified subset (default: all)")
    parser.add_argument("--latency-repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for latency and CPU training")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda for pruning and fine-tuning")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench")
    return parser.parse_args(argv)


def budget_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe, with the budget the command line sets (None keeps the recipe's value)."""
    overrides = {"prune.target_factor": args.target, "prune.step": args.step, "prune.max_accuracy_drop": args.max_drop,
                 "prune.val_samples": args.val_samples, "prune.analysis": str(args.analysis),
                 "prune.step_finetune.max_steps": args.step_steps, "prune.step_finetune.lr": args.lr,
                 "prune.finetune.max_steps": args.final_steps, "prune.finetune.lr": args.lr,
                 "prune.samples": args.test_samples, "data.root": str(args.data_root) if args.data_root else None,
                 "device": args.device}
    return load_recipe(args.recipe, overrides)


# ----------------------------------------------------------------------------- (a) dnnprune


def run_ours(baseline: nn.Module, recipe: Recipe, device: torch.device) -> tuple[nn.Module, dict[str, Any], int]:
    progress = progress_bar()
    model, report = prune(copy.deepcopy(baseline), recipe.prune, data=recipe.data, device=device, progress=progress,
                          on_step=lambda row: progress.console.print(_row_line(row)))
    return model, report, _optimizer_steps(report)


def _optimizer_steps(report: dict[str, Any]) -> int:
    """Optimizer steps (a) spent: one brief fine-tune per evaluated step, then the final fine-tune."""
    final = (report.get("final_finetune") or {}).get("steps", 0)
    return sum(row["finetune_steps"] for row in report.get("steps", [])) + final


def _row_line(row: dict[str, Any]) -> str:
    verdict = "kept" if row["accepted"] else "undone"
    return (f"step {row['step']:>3} {row['layer']:<14} ratio {row['ratio']:.2f} width {row['width_before']}->"
            f"{row['width_after']} MACs {row['macs']:,} val {row['val_top1']:.4f} drop {row['drop'] * 100:.2f} {verdict}")


# ----------------------------------------------------------------------------- (b) Torch-Pruning


def tp_uniform_l1(baseline: nn.Module, shape: tuple[int, ...], factor: float,
                  round_to: int) -> tuple[nn.Module, float, float]:
    """MagnitudePruner, uniform L1 (no global ranking): the smallest ratio reaching `factor` x fewer MACs.

    It rounds channel counts like our recipe does (`round_to`), so latencies compare like with like."""
    base = sum(count_macs(baseline, shape).values())

    def pruned(ratio: float) -> tuple[nn.Module, float]:
        model = copy.deepcopy(baseline).cpu().eval()
        ignored = [model.get_submodule(name) for name in output_layers(model, shape)]
        pruner = tp.pruner.MagnitudePruner(model, torch.zeros(1, *shape), importance=tp.importance.GroupMagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=ignored, global_pruning=False,
                                           round_to=round_to if round_to > 1 else None)
        pruner.step()
        return model, base / sum(count_macs(model, shape).values())

    low, high = 0.0, 0.95
    if pruned(high)[1] < factor:
        raise SystemExit(f"Torch-Pruning cannot reach {factor}x fewer MACs even at ratio {high}")
    while high - low > 1e-3:
        middle = (low + high) / 2
        low, high = (low, middle) if pruned(middle)[1] >= factor else (middle, high)
    model, reached = pruned(high)
    return model, high, reached


def finetune(model: nn.Module, recipe: Recipe, steps: int, device: torch.device) -> dict[str, Any]:
    section = recipe.prune.finetune.model_copy(update={"max_steps": max(1, steps), "epochs": float(max(1, steps))})
    loader = train_loader(meta_of(model), recipe.data, section.batch_size, recipe.prune.seed)
    with progress_bar() as progress:
        history = train(model, loader, section, device=device, progress=progress, description="tp fine-tune",
                        seed=recipe.prune.seed)
    return history.as_dict()


# ----------------------------------------------------------------------------- measuring


def measure(name: str, model: nn.Module, recipe: Recipe, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    meta = meta_of(model)
    shape = tuple(meta.input_shape)
    test = evaluate(model.to(device), eval_loader(meta, recipe.data, "test", samples=args.test_samples), device)
    model.to("cpu")
    latency = measure_latency(model, shape, 64, repeats=args.latency_repeats, threads=args.threads)
    return {"model": name, "test_top1": test.top1, "test_samples": test.samples, "params": count_parameters(model),
            "macs": sum(count_macs(model, shape).values()), "latency_b64_ms": latency.median_ms,
            "latency": latency.as_dict()}


def summarise(rows: list[dict[str, Any]], target: float) -> list[dict[str, Any]]:
    base = rows[0]
    for row in rows:
        row["macs_reduction"] = base["macs"] / row["macs"]
        row["params_reduction"] = base["params"] / row["params"]
        row["speedup_b64"] = base["latency_b64_ms"] / row["latency_b64_ms"]
        row["speedup_over_macs"] = row["speedup_b64"] / row["macs_reduction"]
        row["top1_drop_pts"] = (base["test_top1"] - row["test_top1"]) * 100
        row["goals"] = {"macs>=target": row["macs_reduction"] >= target, "drop<=1pt": row["top1_drop_pts"] <= 1.0,
                        "speedup>=0.8xmacs": row["speedup_over_macs"] >= 0.8}
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | test top-1 | drop (pts) | params | MACs | MACs ↓ | latency b64 (ms) | speedup | speedup / MACs ↓ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['test_top1'] * 100:.2f} | {r['top1_drop_pts']:.2f} | {r['params']:,} | "
                     f"{r['macs']:,} | {r['macs_reduction']:.2f}x | {r['latency_b64_ms']:.1f} | {r['speedup_b64']:.2f}x | "
                     f"{r['speedup_over_macs']:.2f} |")
    return "\n".join(lines)


def check_reload(model: nn.Module, path: Path) -> bool:
    """Our pruned model saved in our format rebuilds with identical outputs (no pickle, no replay)."""
    dnnprune.save(model, path, force=True)
    sample = torch.randn(4, *meta_of(model).input_shape)
    with torch.inference_mode():
        return bool(torch.equal(model.eval()(sample), dnnprune.load(path)(sample)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.analysis.exists():
        sys.exit(f"analysis report {args.analysis} not found; run `dnnprune analyze {args.checkpoint} -o {args.analysis}`")
    recipe = budget_recipe(args)
    device = resolve_device(recipe.device)
    args.out.mkdir(parents=True, exist_ok=True)
    baseline = dnnprune.load(args.checkpoint)
    shape = tuple(meta_of(baseline).input_shape)
    started = time.perf_counter()
    ours, report, our_steps = run_ours(baseline, recipe, device)
    ours_seconds = time.perf_counter() - started
    reached = report["reduction"]["macs"]
    factor = max(recipe.prune.target_factor or 3.0, reached)
    theirs, tp_ratio, tp_reached = tp_uniform_l1(baseline, shape, factor, recipe.prune.round_to)
    tp_steps = our_steps if args.tp_budget == "total" else recipe.prune.finetune.max_steps or our_steps
    started = time.perf_counter()
    tp_history = finetune(theirs, recipe, tp_steps, device)
    tp_seconds = time.perf_counter() - started
    rows = summarise([measure("baseline", baseline, recipe, device, args),
                      measure(_our_label(recipe), ours, recipe, device, args),
                      measure("Torch-Pruning MagnitudePruner uniform L1", theirs, recipe, device, args)],
                     recipe.prune.target_factor or 3.0)
    result = {"checkpoint": str(args.checkpoint), "analysis": str(args.analysis), "recipe": recipe.model_dump(mode="json"),
              "rows": rows, "ours": {"optimizer_steps": our_steps, "seconds": ours_seconds, "report": report,
                                     "reload_identical": check_reload(ours, args.out / "vgg16_bn-fmnist-pruned.safetensors")},
              "torch_pruning": {"ratio": tp_ratio, "macs_reduction_at_prune": tp_reached, "optimizer_steps": tp_steps,
                                "seconds": tp_seconds, "finetune": tp_history},
              "threads": torch.get_num_threads(), "torch": torch.__version__, "torch_pruning_version": tp.__version__}
    (args.out / "prune_vgg16.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = markdown(rows)
    (args.out / "prune_vgg16.md").write_text(table + "\n")
    print(table)
    print(f"\nJSON: {args.out / 'prune_vgg16.json'}")
    return 0


def _our_label(recipe: Recipe) -> str:
    mode = "accuracy-aware" if recipe.prune.accuracy_aware else "one-shot"
    return f"dnnprune {recipe.prune.order} order, {mode}"


if __name__ == "__main__":
    raise SystemExit(main())
