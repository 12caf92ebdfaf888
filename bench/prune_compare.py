"""Benchmark: filter pruning to a MACs target, with a control and Torch-Pruning side by side, over seeds.

From one baseline checkpoint and one recipe (`prune:` section), per seed:

- dnnprune: `prune` as the recipe says (accuracy-aware increments or one-shot, sensitivity order from
  the analysis report), timed;
- control: the same baseline fine-tuned through exactly the phases the pruned model received (each kept
  increment's fine-tune, then the final fine-tune: same steps, learning rates, schedules and batch
  seeds), with no pruning: what the extra training alone gives;
- with `--depth-recipe`, the dnnprune arm first removes whole blocks (a `prune:` section at layer
  granularity, with its own fine-tune), re-runs the channel sensitivity analysis on what is left, and
  then prunes channels to the recipe's MACs target counted against the *original* baseline; the control
  then also gets the depth stage's fine-tune phase;
- tp: Torch-Pruning's MagnitudePruner, uniform group-L1, channel counts rounded like the recipe, its ratio
  bisected to the MACs nearest the dnnprune model's (rounding makes MACs jump: resnet18's 64-wide layers
  go from 32 to 16 channels between two ratios 0.0001 apart, 3.9x to 6.7x fewer MACs, so "at least as
  far down" could hand the anchor far fewer MACs), then one fine-tune with as many steps as the dnnprune
  model received, at the recipe's final fine-tune settings.

`--reuse-arms dnnprune,control` takes those arms' rows (and the saved dnnprune models) from an earlier
run's OUT/result.json and runs only the other arms, e.g. to redo the anchor without redoing the rest.

Test metric for all, mean and sample standard deviation over seeds; latency of baseline and every
pruned model measured interleaved in one process (medians) at batch 1 and 64.

    python bench/prune_compare.py runs/cache/vgg16_bn-fmnist.safetensors -r recipes/prune-vgg16-fmnist.yaml \\
        --analysis runs/cache/vgg16_bn-fmnist.analysis.json --seeds 0,1,2 --out runs/bench/prune-vgg16
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import dnnprune
from dnnprune.analysis import analyze, write_outputs
from dnnprune.checkpoint import attach_meta, meta_of, save
from dnnprune.latency import compare_models
from dnnprune.loaders import eval_loader, train_loader
from dnnprune.metrics import count_macs, count_parameters
from dnnprune.pruning import prune
from dnnprune.recipe import FineTuneSection, Recipe, load_recipe
from dnnprune.surgery import output_layers
from dnnprune.tasks import make_task
from dnnprune.training import evaluate, fit_loop, frozen_teacher

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-r", "--recipe", type=Path, required=True)
    parser.add_argument("--analysis", type=Path, default=None, help="overrides the recipe's prune.analysis")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--arms", default="dnnprune,control,tp")
    parser.add_argument("--split", choices=["val", "test"], default="test")
    parser.add_argument("--depth-recipe", type=Path, default=None,
                        help="a recipe whose prune: section removes whole units (granularity layer) before the channels")
    parser.add_argument("--latency-repeats", type=int, default=30)
    parser.add_argument("--reuse-arms", default="",
                        help="comma list of arms (dnnprune, control) to take from OUT/result.json instead of running")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def test_metrics(model: nn.Module, recipe: Recipe, split: str) -> dict[str, Any]:
    meta = meta_of(model)
    task = make_task(meta.task)
    result = evaluate(model, eval_loader(meta, recipe.data, split=split), "cpu", task=task)  # type: ignore[arg-type]
    shape = tuple(meta.input_shape)
    return {"metric": task.primary, "value": result.value, "params": count_parameters(model),
            "macs": sum(count_macs(model, shape).values())}


def received_phases(report: Any, recipe: Recipe) -> list[tuple[FineTuneSection, int]]:
    """The fine-tune phases the pruned model kept, in order, each with the seed it drew its batches with."""
    seed = recipe.prune.seed
    phases: list[tuple[FineTuneSection, int]] = []
    draws = 0
    for row in report.steps:
        steps = row.get("finetune_steps", 0)
        if steps:
            if row.get("accepted"):
                phases.append((recipe.prune.step_finetune.model_copy(update={"epochs": 0.0, "max_steps": steps}),
                               seed + draws))
            draws += 1
    final = report.final_finetune or {}
    if final.get("steps") and final.get("kept", True):
        phases.append((recipe.prune.finetune.model_copy(update={"epochs": 0.0, "max_steps": final["steps"]}),
                       seed + draws))
    return phases


def arm_dnnprune(args: argparse.Namespace, recipe: Recipe, seed: int) -> tuple[nn.Module, dict[str, Any], tuple[Any, Any]]:
    section = recipe.prune.model_copy(update={"seed": seed, "evaluate": False})
    started = time.perf_counter()
    model, depth = depth_stage(args, recipe, seed)
    if depth is not None:
        section = channel_section(args, recipe, section, model, seed)
    model, report = prune(model, section, data=recipe.data)
    seconds = time.perf_counter() - started
    save(model, args.out / f"dnnprune-seed{seed}.safetensors", force=True)
    steps = sum(p.max_steps or 0 for p, _ in all_phases((depth, report), recipe.model_copy(update={"prune": section}), args))
    row = {"arm": "dnnprune", "seed": seed, "seconds": seconds, "finetune_steps_received": steps,
           "target_met": (report.target or {}).get("met"), "increments": [
               {k: r.get(k) for k in ("increment", "attempt", "macs", "val", "drop", "drop_stderr", "accepted", "seconds")}
               for r in report.steps], **test_metrics(model, recipe, args.split)}
    if depth is not None:
        row["depth"] = {"removed": [s.get("unit") or s.get("name") for s in depth.steps], "target": report.target}
    return model, row, (depth, report)


def depth_stage(args: argparse.Namespace, recipe: Recipe, seed: int) -> tuple[nn.Module, Any]:
    """The baseline, or (with --depth-recipe) the baseline with its least sensitive units removed and fine-tuned."""
    model = dnnprune.load(args.checkpoint)
    if args.depth_recipe is None:
        return model, None
    depth = load_recipe(args.depth_recipe).prune.model_copy(update={"seed": seed, "evaluate": False})
    return prune(model, depth, data=recipe.data)


def channel_section(args: argparse.Namespace, recipe: Recipe, section: Any, model: nn.Module, seed: int) -> Any:
    """The depth-pruned model's own channel analysis, and the recipe's target counted from the original."""
    _, report = analyze(model, recipe.analyze, data=recipe.data, device=torch.device("cpu"))
    path = write_outputs(report, args.out / f"depth-seed{seed}.analysis.json")["json"]
    return section.model_copy(update={"analysis": str(path), "target_basis": "original"})


def all_phases(reports: tuple[Any, Any], recipe: Recipe, args: argparse.Namespace) -> list[tuple[FineTuneSection, int]]:
    """The depth stage's fine-tune (if any), then the channel stage's phases: what the control replays."""
    depth, report = reports
    phases: list[tuple[FineTuneSection, int]] = []
    if depth is not None:
        section = load_recipe(args.depth_recipe).prune.model_copy(update={"seed": recipe.prune.seed})
        phases = received_phases(depth, recipe.model_copy(update={"prune": section}))
    return phases + received_phases(report, recipe)


def arm_control(args: argparse.Namespace, recipe: Recipe, seed: int, reports: tuple[Any, Any]) -> dict[str, Any]:
    model = dnnprune.load(args.checkpoint)
    section = recipe.prune.model_copy(update={"seed": seed})
    started = time.perf_counter()
    phases = all_phases(reports, recipe.model_copy(update={"prune": section}), args)
    teacher = frozen_teacher(model, section.finetune, section.step_finetune)  # the same loss as the pruned arm
    for config, phase_seed in phases:
        loader = train_loader(meta_of(model), recipe.data, config.batch_size, phase_seed)
        fit_loop(model, loader, config, device=torch.device("cpu"), seed=phase_seed, teacher=teacher)
    return {"arm": "control", "seed": seed, "seconds": time.perf_counter() - started,
            "finetune_steps_received": sum(p.max_steps or 0 for p, _ in phases), **test_metrics(model, recipe, args.split)}


def torch_pruning_uniform(baseline: nn.Module, ratio: float, round_to: int) -> nn.Module:
    """Torch-Pruning's uniform L1 pruning of a copy of `baseline`: every layer loses `ratio` of its channels."""
    import torch_pruning as tp

    shape = tuple(meta_of(baseline).input_shape)
    model = copy.deepcopy(baseline)
    ignored = [model.get_submodule(n) for n in output_layers(model, shape)]
    tp.pruner.MagnitudePruner(model, torch.zeros(1, *shape), importance=tp.importance.GroupMagnitudeImportance(p=1),
                              pruning_ratio=ratio, ignored_layers=ignored, global_pruning=False,
                              round_to=round_to if round_to > 1 else None).step()
    return model


def arm_torch_pruning(args: argparse.Namespace, recipe: Recipe, seed: int, macs: int, steps: int) -> tuple[nn.Module, dict[str, Any]]:
    baseline = dnnprune.load(args.checkpoint)
    shape = tuple(meta_of(baseline).input_shape)

    def pruned(ratio: float) -> nn.Module:
        return torch_pruning_uniform(baseline, ratio, recipe.prune.round_to)

    def macs_at(ratio: float) -> int:
        return sum(count_macs(pruned(ratio), shape).values())

    low, high = 0.0, 0.95  # invariant: MACs(low) > macs >= MACs(high)
    while high - low > 1e-4:
        middle = (low + high) / 2
        low, high = (low, middle) if macs_at(middle) <= macs else (middle, high)
    ratio = low if abs(macs_at(low) - macs) < abs(macs_at(high) - macs) else high
    model = pruned(ratio)
    attach_meta(model, meta_of(baseline))
    started = time.perf_counter()
    if steps:
        config = recipe.prune.finetune.model_copy(update={"epochs": 0.0, "max_steps": steps})
        fit_loop(model, train_loader(meta_of(model), recipe.data, config.batch_size, seed), config,
                 device=torch.device("cpu"), seed=seed, teacher=frozen_teacher(baseline, config))
    save(model, args.out / f"tp-seed{seed}.safetensors", force=True)  # so latency can be re-timed idle later
    return model, {"arm": "tp", "seed": seed, "ratio": ratio, "seconds": time.perf_counter() - started,
                   "finetune_steps_received": steps, **test_metrics(model, recipe, args.split)}


def latency_rows(models: dict[str, nn.Module], shape: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    names = list(models)
    rows = []
    for batch in (1, 64):
        times = compare_models([models[n] for n in names], shape, batch, repeats)
        rows += [{"model": n, "batch_size": batch, "median_ms": ms, "speedup": times[0] / ms} for n, ms in zip(names, times)]
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        values = [r["value"] for r in rows if r["arm"] == arm]
        macs = [r["macs"] for r in rows if r["arm"] == arm]
        out[arm] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
                    "min": min(values), "max": max(values), "n": len(values), "macs": statistics.fmean(macs)}
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, {"prune.analysis": str(args.analysis) if args.analysis else None})
    args.out.mkdir(parents=True, exist_ok=True)
    baseline = dnnprune.load(args.checkpoint)
    shape = tuple(meta_of(baseline).input_shape)
    rows = [{"arm": "baseline", "seed": None, **test_metrics(baseline, recipe, args.split)}]
    arms = args.arms.split(",")
    latency_models: dict[str, nn.Module] = {"baseline": baseline}
    earlier = reused_rows(args)
    for seed in [int(s) for s in args.seeds.split(",")]:
        if "dnnprune" in earlier:
            ours, row = dnnprune.load(args.out / f"dnnprune-seed{seed}.safetensors"), earlier["dnnprune"][seed]
        else:
            ours, row, reports = arm_dnnprune(args, recipe, seed)
        rows.append(row)
        latency_models[f"dnnprune-seed{seed}"] = ours
        if "control" in earlier:
            rows.append(earlier["control"][seed])
        elif "control" in arms:
            rows.append(arm_control(args, recipe, seed, reports))
        if "tp" in arms:
            theirs, tp_row = arm_torch_pruning(args, recipe, seed, row["macs"], row["finetune_steps_received"])
            rows.append(tp_row)
            latency_models[f"tp-seed{seed}"] = theirs
        write(args, rows, [])
    write(args, rows, latency_rows(latency_models, shape, args.latency_repeats))


def reused_rows(args: argparse.Namespace) -> dict[str, dict[int, dict[str, Any]]]:
    """The rows of `--reuse-arms` from the earlier OUT/result.json, by arm and seed; exits with a line if any is missing."""
    arms = [a for a in args.reuse_arms.split(",") if a]
    if not arms:
        return {}
    if "control" not in arms and "dnnprune" in arms and "control" in args.arms.split(","):
        raise SystemExit("--reuse-arms dnnprune needs control reused too (the control replays the pruned run's phases)")
    path = args.out / "result.json"
    if not path.is_file():
        raise SystemExit(f"--reuse-arms: {path} not found; run the arms first")
    rows = json.loads(path.read_text())["rows"]
    found = {arm: {r["seed"]: r for r in rows if r["arm"] == arm} for arm in arms}
    for arm in arms:
        for seed in (int(s) for s in args.seeds.split(",")):
            if seed not in found[arm]:
                raise SystemExit(f"--reuse-arms: {path} has no {arm} row for seed {seed}")
    return found


def write(args: argparse.Namespace, rows: list[dict[str, Any]], latency: list[dict[str, Any]]) -> None:
    base = rows[0]
    for row in rows:
        row["macs_reduction"] = base["macs"] / row["macs"]
        row["drop_pts"] = (base["value"] - row["value"]) * 100
    result = {"command": " ".join(sys.argv), "split": args.split, "threads": torch.get_num_threads(), "rows": rows,
              "summary": summary(rows[1:]) if len(rows) > 1 else {}, "latency": latency}
    (args.out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    lines = ["| arm | seed | test metric | params | MACs | MACs ↓ | fine-tune steps | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['value'] * 100:.2f} % | {r['params']:,} | {r['macs']:,} | "
                     f"{r['macs_reduction']:.2f}x | {r.get('finetune_steps_received', '-')} | {r.get('seconds', 0):.0f} |")
    if latency:
        lines += ["", "| model | batch | median ms | speedup |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch_size']} | {r['median_ms']:.2f} | {r['speedup']:.2f}x |" for r in latency]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
