"""Benchmark: double pruning (network slimming, then magnitude pruning) against a control and Torch-Pruning.

From one baseline checkpoint, per seed, with the same training steps, batches, learning-rate schedule
and data in every arm:

- dnnprune: `double_prune` with the recipe's `double_prune:` section (BN-scale L1 steps, global |gamma|
  slimming, fine-tune, gradual magnitude pruning to the sparsity), saved sparse; then `quantize` with
  the recipe's `quantize:` section (codes stacked on the sparse form);
- control: the same baseline fine-tuned through the same phases (same steps and schedule), with no
  penalty and no pruning: what the extra training alone gives;
- tp: Torch-Pruning's BNScalePruner (its own regularizer, same lambda and steps, global pruning to the
  same channel ratio), the same fine-tune, then `torch.nn.utils.prune.global_unstructured` L1 to the
  SAME non-zero parameter count as the dnnprune arm of that seed, and the same fine-tune with its masks.

Every arm is scored on the test split; recipes are chosen on validation (`--split val`). The sweep mode
(`--sweep`) runs a slimming x sparsity grid (or explicit `points`) per model with short phases, each
point next to a control trained through the same phases unpruned, and plots accuracy against non-zero
parameters with the controls and NetScore marked. Only bench code imports torch_pruning outside dnnprune.

    python bench/double_prune.py CKPT -r recipes/double-prune-vgg16.yaml --seeds 0,1,2 --arms dnnprune,control,tp
    python bench/double_prune.py --sweep bench/double-prune-sweep.yaml --out runs/bench/double-prune-sweep
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune
import yaml

import dnnprune
from dnnprune.checkpoint import atomic_write_bytes, meta_of, predicted_file_bytes, save
from dnnprune.lineage import resolve_device
from dnnprune.loaders import eval_loader, train_loader
from dnnprune.metrics import count_macs, count_nonzero_parameters, count_parameters
from dnnprune.pruning.double import double_prune, slimming_round_steps
from dnnprune.quantization import quantize
from dnnprune.recipe import FineTuneSection, NetScoreSection, Recipe, load_recipe
from dnnprune.scoring import netscore_block
from dnnprune.surgery import output_layers
from dnnprune.tasks import make_task
from dnnprune.training import evaluate, fit_loop, frozen_teacher

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path)
    parser.add_argument("-r", "--recipe", type=Path, default=ROOT / "recipes/double-prune-vgg16.yaml")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--arms", default="dnnprune,control,tp")
    parser.add_argument("--split", choices=["val", "test"], default="test",
                        help="score on val while choosing a recipe, on test for the final rows")
    parser.add_argument("--sweep", type=Path, help="YAML: models (checkpoint, recipe) x slimming x sparsity")
    parser.add_argument("--merge", type=Path, nargs="+", help="result folders of runs split over processes "
                        "(e.g. one per seed or arm): one table and summary from all their rows")
    parser.add_argument("--nonzero-from", type=Path, help="the tp arm without the dnnprune arm in this process: "
                        "match the non-zero count of the dnnprune row of the same seed in DIR/result.json")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="with --nonzero-from: wait up to this long for that row (it is read just before the "
                        "tp arm's parameter pruning, so both arms can run at once)")
    parser.add_argument("--parallel", action="store_true",
                        help="one process per (seed, arm), all at once, then one merged table: for a machine with "
                        "many cores or a GPU that one process leaves idle")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto; where every arm trains and is scored")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench/double-prune")
    return parser.parse_args(argv)


DEVICE = torch.device("cpu")  # set once from --device in main(); every arm trains and scores there


def matched_nonzero(folder: Path, seed: int, wait: float = 0.0) -> int:
    """The dnnprune arm's non-zero count for `seed` from another process's run, polled for up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        found = [row["nonzero_params"] for row in _rows_in(folder) if row["arm"] == "dnnprune" and row["seed"] == seed]
        if found:
            return int(found[0])
        if time.monotonic() >= deadline:
            raise SystemExit(f"{folder}/result.json has no dnnprune row for seed {seed}")
        time.sleep(2.0)


def _rows_in(folder: Path) -> list[dict[str, Any]]:
    """Rows of a result.json that may not exist yet or may be half-written by a running process."""
    try:
        return json.loads((folder / "result.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []


# ----------------------------------------------------------------------------- measuring


def measure(model: nn.Module, recipe: Recipe, split: str, file_bytes: int | None = None) -> dict[str, Any]:
    meta = meta_of(model)
    task = make_task(meta.task)
    model.to(DEVICE)
    metrics = evaluate(model, eval_loader(meta, recipe.data, split=split), DEVICE, task=task)  # type: ignore[arg-type]
    shape = tuple(meta.input_shape)
    size = {"params": count_parameters(model), "nonzero_params": count_nonzero_parameters(model),
            "macs": sum(count_macs(model, shape).values())}
    block = netscore_block(task, metrics.value, size, NetScoreSection().model_dump())
    return {"split": split, task.primary: metrics.value, **size, "file_bytes": file_bytes,
            "netscore": block["value"], "netscore_nonzero": block["value_nonzero"]}


def phases(recipe: Recipe) -> list[tuple[str, int]]:
    """The training phases of the recipe's double-prune run, in order: (name, steps)."""
    section = recipe.double_prune
    rows = []
    if section.slimming_ratio > 0:
        rows.append(("sparsity training", section.sparsity_steps))
        rows += [(f"fine-tune after slimming round {k + 1}", steps) for k, steps in enumerate(slimming_round_steps(section))]
    if section.sparsity > 0:
        rows.append(("gradual magnitude pruning", section.finetune_steps))
    return [(name, steps) for name, steps in rows if steps > 0]


def run_phase(model: nn.Module, recipe: Recipe, index: int, steps: int, seed: int, **kwargs: Any) -> None:
    """One phase exactly as double_prune runs it: the section's optimizer, `steps` steps, the phase's seed."""
    config: FineTuneSection = recipe.double_prune.finetune.model_copy(update={"epochs": 0.0, "max_steps": steps})
    phase_seed = seed + index
    loader = train_loader(meta_of(model), recipe.data, config.batch_size, phase_seed)
    fit_loop(model, loader, config, device=DEVICE, description=f"phase {index}", seed=phase_seed, **kwargs)


# ----------------------------------------------------------------------------- the arms


def arm_dnnprune(checkpoint: Path, recipe: Recipe, seed: int, split: str, out: Path) -> dict[str, Any]:
    model = dnnprune.load(checkpoint)
    section = recipe.double_prune.model_copy(update={"seed": seed, "evaluate": False})
    started = time.perf_counter()
    model, report = double_prune(model, section, data=recipe.data, device=DEVICE)
    seconds = time.perf_counter() - started
    path = save(model, out / f"dnnprune-seed{seed}.safetensors", force=True)
    row = {"arm": "dnnprune", "seed": seed, "seconds": seconds, **measure(model, recipe, split, path.stat().st_size),
           "slimming_threshold": (report.slimming or {}).get("threshold"),
           "reached_sparsity": (report.parameter_pruning or {}).get("reached_sparsity")}
    quantized, _ = quantize(dnnprune.load(path), recipe.quantize.model_copy(update={"evaluate": False}), data=recipe.data,
                            device=DEVICE)
    qpath = save(quantized, out / f"dnnprune-q-seed{seed}.safetensors", force=True)
    row["quantized"] = measure(quantized, recipe, split, qpath.stat().st_size)
    return row


def arm_control(checkpoint: Path, recipe: Recipe, seed: int, split: str) -> dict[str, Any]:
    model = dnnprune.load(checkpoint)
    teacher = frozen_teacher(model, recipe.double_prune.finetune)  # the same loss as the pruned arms
    started = time.perf_counter()
    for index, (_, steps) in enumerate(phases(recipe)):
        run_phase(model, recipe, index, steps, seed, teacher=teacher)
    return {"arm": "control", "seed": seed, "seconds": time.perf_counter() - started,
            **measure(model, recipe, split, predicted_file_bytes(model, meta_of(model)))}


def arm_torch_pruning(checkpoint: Path, recipe: Recipe, seed: int, split: str,
                      nonzero: Callable[[], int]) -> dict[str, Any]:
    """BNScalePruner at the same lambda, steps and channel ratio, then global L1 to `nonzero()` non-zeros
    (asked for only when the parameter pruning starts, so it may come from a process running alongside)."""
    import torch_pruning as tp

    model = dnnprune.load(checkpoint).to(DEVICE)
    meta = meta_of(model)
    section = recipe.double_prune
    strength = section.sparsity_lambda if section.sparsity_lambda is not None else (
        1e-5 if any(hasattr(m, "downsample") or type(m).__name__ == "BasicBlock" for m in model.modules()) else 1e-4)
    example = torch.zeros(1, *meta.input_shape, device=DEVICE)
    teacher = frozen_teacher(model, section.finetune)  # distils exactly as the dnnprune arm does, when it does
    last = model.get_submodule(output_layers(model, meta.input_shape)[0])
    started = time.perf_counter()
    index = 0
    if section.slimming_ratio > 0:
        pruner = tp.pruner.BNScalePruner(model, example, importance=tp.importance.BNScaleImportance(),
                                         global_pruning=True, pruning_ratio=section.slimming_ratio, reg=strength,
                                         ignored_layers=[last], iterative_steps=section.slimming_rounds)
        if section.sparsity_steps:
            run_phase(model, recipe, index, section.sparsity_steps, seed, after_backward=pruner.regularize, bn_l1=0.0,
                      teacher=teacher)
            index += 1
        for steps in slimming_round_steps(section):
            pruner.step()  # the same rounds and fine-tune shares as the dnnprune arm, on TP's own schedule
            if steps:
                run_phase(model, recipe, index, steps, seed, teacher=teacher)
                index += 1
    if section.sparsity > 0:
        weights = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        dense_rest = count_parameters(model) - sum(m.weight.numel() for m, _ in weights)
        amount = max(0, sum(m.weight.numel() for m, _ in weights) - (nonzero() - dense_rest))
        torch_prune.global_unstructured(weights, pruning_method=torch_prune.L1Unstructured, amount=int(amount))
        if section.finetune_steps:
            run_phase(model, recipe, index, section.finetune_steps, seed, teacher=teacher)
        for module, name in weights:
            torch_prune.remove(module, name)
    return {"arm": "tp", "seed": seed, "seconds": time.perf_counter() - started, "lambda": strength,
            **measure(model, recipe, split, None)}


# ----------------------------------------------------------------------------- reporting


def summary(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Mean and spread (sample standard deviation, min, max) per arm."""
    out: dict[str, Any] = {}
    for arm in sorted({r["arm"] for r in rows}):
        values = [r[metric] for r in rows if r["arm"] == arm]
        nonzero = [r["nonzero_params"] for r in rows if r["arm"] == arm]
        out[arm] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
                    "min": min(values), "max": max(values), "n": len(values),
                    "nonzero_params": statistics.fmean(nonzero)}
    return out


def markdown(rows: list[dict[str, Any]], baseline: dict[str, Any], metric: str) -> str:
    lines = [f"| arm | seed | {metric} | params | non-zero | MACs | file bytes | NetScore (all / non-zero) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in [{"arm": "baseline", "seed": "-", **baseline}, *rows]:
        file_bytes = f"{row['file_bytes']:,}" if row.get("file_bytes") else "-"  # tp keeps dense tensors: no file
        lines.append(f"| {row['arm']} | {row['seed']} | {row[metric] * 100:.2f} % | {row['params']:,} | "
                     f"{row['nonzero_params']:,} | {row['macs']:,} | {file_bytes} | "
                     f"{row['netscore']:.2f} / {row['netscore_nonzero']:.2f} |")
        if row.get("quantized"):
            q = row["quantized"]
            lines.append(f"| {row['arm']} + quantize | {row['seed']} | {q[metric] * 100:.2f} % | {q['params']:,} | "
                         f"{q['nonzero_params']:,} | {q['macs']:,} | {q['file_bytes']:,} | "
                         f"{q['netscore']:.2f} / {q['netscore_nonzero']:.2f} |")
    lines += ["", f"| arm | seeds | mean {metric} | std | min | max | mean non-zero |", "|---|---|---|---|---|---|---|"]
    quantized = [{**row["quantized"], "arm": f"{row['arm']} + quantize"} for row in rows if row.get("quantized")]
    for arm, stats in summary([*rows, *quantized], metric).items():
        std = f"{stats['std'] * 100:.2f}" if stats["std"] is not None else "-"
        lines.append(f"| {arm} | {stats['n']} | {stats['mean'] * 100:.2f} % | {std} | {stats['min'] * 100:.2f} % | "
                     f"{stats['max'] * 100:.2f} % | {stats['nonzero_params']:,.0f} |")
    return "\n".join(lines) + "\n"


def run_headline(args: argparse.Namespace) -> dict[str, Any]:
    recipe = load_recipe(args.recipe)
    args.out.mkdir(parents=True, exist_ok=True)
    baseline_model = dnnprune.load(args.checkpoint)
    metric = make_task(meta_of(baseline_model).task).primary
    baseline = measure(baseline_model, recipe, args.split, args.checkpoint.stat().st_size)
    rows: list[dict[str, Any]] = []
    arms = args.arms.split(",")
    for seed in [int(s) for s in args.seeds.split(",")]:
        ours = arm_dnnprune(args.checkpoint, recipe, seed, args.split, args.out) if "dnnprune" in arms else None
        if ours:
            rows.append(ours)
        if "control" in arms:
            rows.append(arm_control(args.checkpoint, recipe, seed, args.split))
        if "tp" in arms and (ours or args.nonzero_from):
            def nonzero(ours: dict[str, Any] | None = ours, seed: int = seed) -> int:
                return ours["nonzero_params"] if ours else matched_nonzero(args.nonzero_from, seed, args.wait)

            rows.append(arm_torch_pruning(args.checkpoint, recipe, seed, args.split, nonzero))
        _write(args.out, baseline, rows, metric, args)
    return _write(args.out, baseline, rows, metric, args)


def _write(out: Path, baseline: dict[str, Any], rows: list[dict[str, Any]], metric: str,
           args: argparse.Namespace) -> dict[str, Any]:
    result = {"command": " ".join(sys.argv), "baseline": baseline, "rows": rows, "summary": summary(rows, metric),
              "threads": torch.get_num_threads(), "split": args.split, "device": _device_name()}
    # atomic: a process running alongside may be polling this file
    atomic_write_bytes(out / "result.json", json.dumps(result, indent=2).encode())
    (out / "table.md").write_text(markdown(rows, baseline, metric))
    print(markdown(rows, baseline, metric), flush=True)
    return result


# ----------------------------------------------------------------------------- sweep


def run_sweep(args: argparse.Namespace) -> None:
    """Per model: the baseline, a control per distinct training budget, and every (slimming, sparsity)
    point with its drop against the control that got the same phases; a table and a PNG."""
    plan = yaml.safe_load(args.sweep.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    points: list[dict[str, Any]] = []
    for model_plan in plan["models"]:
        checkpoint, recipe = Path(model_plan["checkpoint"]), load_recipe(Path(model_plan["recipe"]))
        if plan.get("phases"):
            recipe.double_prune = recipe.double_prune.model_copy(update=plan["phases"])
        base = dnnprune.load(checkpoint)
        points.append({"model": model_plan["name"], "arm": "baseline", "slimming": 0.0, "sparsity": 0.0, "steps": 0,
                       **measure(base, recipe, args.split, checkpoint.stat().st_size)})
        controls: dict[tuple[int, ...], dict[str, Any]] = {}
        for slimming, sparsity in grid(plan):
            point_recipe = recipe.model_copy(deep=True)
            point_recipe.double_prune = recipe.double_prune.model_copy(
                update={"slimming_ratio": slimming, "sparsity": sparsity, "evaluate": False})
            budget = tuple(steps for _, steps in phases(point_recipe))
            if budget not in controls:  # the same phases without pruning: what the training alone gives
                controls[budget] = {"model": model_plan["name"], "arm": "control", "slimming": 0.0, "sparsity": 0.0,
                                    "steps": sum(budget), **arm_control(checkpoint, point_recipe, 0, args.split)}
                points.append(controls[budget])
            model, _ = double_prune(dnnprune.load(checkpoint), point_recipe.double_prune, data=recipe.data,
                                    device=DEVICE)
            path = save(model, args.out / f"{model_plan['name']}-{slimming}-{sparsity}.safetensors", force=True)
            row = measure(model, recipe, args.split, path.stat().st_size)
            metric = next(k for k in ("top1", "roc_auc") if k in row)
            points.append({"model": model_plan["name"], "arm": "double-prune", "slimming": slimming, "sparsity": sparsity,
                           "steps": sum(budget), **row, "drop_vs_control": controls[budget][metric] - row[metric]})
            _write_points(args.out, points)  # after every point, so a long sweep keeps what it measured
    _write_points(args.out, points)
    (args.out / "sweep.md").write_text(sweep_table(points))
    plot_sweep(points, args.out / "sweep.png")
    print(sweep_table(points))


def _write_points(out: Path, points: list[dict[str, Any]]) -> None:
    (out / "sweep.json").write_text(json.dumps({"command": " ".join(sys.argv), "points": points}, indent=2))


def grid(plan: dict[str, Any]) -> list[tuple[float, float]]:
    """The plan's explicit `points`, or every slimming x sparsity pair but (0, 0) (that is the baseline)."""
    if plan.get("points"):
        return [(float(a), float(b)) for a, b in plan["points"]]
    return [(a, b) for a in plan["slimming"] for b in plan["sparsity"] if a or b]


def sweep_table(points: list[dict[str, Any]]) -> str:
    metric = next(k for k in ("top1", "roc_auc") if k in points[0])
    best_after = {}
    for p in points:
        if p["arm"] == "double-prune":
            if p["model"] not in best_after or p["netscore_nonzero"] > best_after[p["model"]]["netscore_nonzero"]:
                best_after[p["model"]] = p
    lines = [f"| model | arm | slimming | sparsity | steps | {metric} | drop vs control (pts) | params | non-zero | MACs | "
             "NetScore | NetScore (non-zero) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        mark = " **best of model**" if best_after.get(p["model"]) is p else ""
        drop = f"{p['drop_vs_control'] * 100:+.2f}" if "drop_vs_control" in p else "-"
        lines.append(f"| {p['model']} | {p['arm']} | {p['slimming']} | {p['sparsity']} | {p['steps']} | "
                     f"{p[metric] * 100:.2f} % | {drop} | {p['params']:,} | {p['nonzero_params']:,} | {p['macs']:,} | "
                     f"{p['netscore']:.2f} | {p['netscore_nonzero']:.2f}{mark} |")
    winner = max(best_after.values(), key=lambda p: p["netscore_nonzero"]) if best_after else None
    if winner:
        lines.append(f"\nBest NetScore after pruning (non-zero params): **{winner['model']}** "
                     f"({winner['netscore_nonzero']:.2f} at slimming {winner['slimming']}, sparsity {winner['sparsity']}, "
                     f"{winner['drop_vs_control'] * 100:+.2f} pts against its control).")
    return "\n".join(lines) + "\n"


def plot_sweep(points: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = next(k for k in ("top1", "roc_auc") if k in points[0])
    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for model in dict.fromkeys(p["model"] for p in points):
        rows = sorted((p for p in points if p["model"] == model and p["arm"] != "control"),
                      key=lambda p: -p["nonzero_params"])
        line = ax.plot([p["nonzero_params"] for p in rows], [p[metric] * 100 for p in rows], marker="o", label=model)[0]
        for control in (p for p in points if p["model"] == model and p["arm"] == "control"):
            ax.plot([control["nonzero_params"]], [control[metric] * 100], marker="*", markersize=10,
                    color=line.get_color(), linestyle="none")
        best = max((p for p in rows if p["arm"] == "double-prune"), key=lambda p: p["netscore_nonzero"], default=rows[0])
        ax.annotate(f"NetScore {best['netscore_nonzero']:.1f}", (best["nonzero_params"], best[metric] * 100),
                    textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("non-zero parameters (log)")
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title("double pruning: accuracy against non-zero parameters\n(stars: controls, same training unpruned; best NetScore marked)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))


def run_merge(args: argparse.Namespace) -> dict[str, Any]:
    """Rows of several runs of the same baseline and recipe (run in parallel processes) in one table;
    or, where the folders hold sweeps (one model each, say, one per core), one sweep table and PNG."""
    if all((folder / "sweep.json").exists() for folder in args.merge):
        return merge_sweeps(args)
    results = [json.loads((folder / "result.json").read_text()) for folder in args.merge]
    if not all(_same_baseline(results[0]["baseline"], r["baseline"]) for r in results) or \
            len({r["split"] for r in results}) != 1:
        raise SystemExit("the runs to merge must share the baseline measurement and the split")
    rows = sorted((row for r in results for row in r["rows"]), key=lambda row: (row["seed"], row["arm"]))
    args.split = results[0]["split"]
    args.out.mkdir(parents=True, exist_ok=True)
    metric = "top1" if "top1" in results[0]["baseline"] else "roc_auc"
    return _write(args.out, results[0]["baseline"], rows, metric, args)


def _same_baseline(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same checkpoint measured by two processes: sizes equal, scores equal up to GPU kernel choice."""
    if a.keys() != b.keys():
        return False
    return all(abs(a[k] - b[k]) <= 1e-3 if isinstance(a[k], float) else a[k] == b[k] for k in a)


def merge_sweeps(args: argparse.Namespace) -> dict[str, Any]:
    """The points of several sweep folders, in the order given, as if one sweep had measured them all.

    A model's points may be split over processes too; each then measured the baseline and the control
    of its budget, so only the first baseline per model and the first control per (model, steps) stay.
    """
    points, seen = [], set()
    for point in (p for folder in args.merge for p in json.loads((folder / "sweep.json").read_text())["points"]):
        key = (point["model"], point["arm"], point["steps"]) if point["arm"] in ("baseline", "control") else None
        if key is None or key not in seen:
            points.append(point)
            seen.add(key)
    if len({"top1" in p for p in points}) > 1:
        raise SystemExit("the sweeps to merge must share the task metric (top1 or roc_auc)")
    args.out.mkdir(parents=True, exist_ok=True)
    _write_points(args.out, points)
    (args.out / "sweep.md").write_text(sweep_table(points))
    plot_sweep(points, args.out / "sweep.png")
    print(sweep_table(points))
    return {"points": points}


def _device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"


def run_parallel(args: argparse.Namespace) -> dict[str, Any]:
    """Every (seed, arm) in its own process at once (tp waits for its seed's dnnprune count), then one table.

    Each process is this script with one seed and one arm, so the rows are exactly those of a serial run.
    """
    arms, seeds = args.arms.split(","), args.seeds.split(",")
    base = [sys.executable, str(Path(__file__).resolve()), str(args.checkpoint), "-r", str(args.recipe),
            "--split", args.split, "--device", args.device]
    jobs: dict[Path, list[str]] = {}
    for seed in seeds:
        for arm in arms:
            folder = args.out / f"{arm}-seed{seed}"
            extra = ["--nonzero-from", str(args.out / f"dnnprune-seed{seed}"), "--wait", "86400"] if arm == "tp" else []
            jobs[folder] = [*base, "--seeds", seed, "--arms", arm, *extra, "--out", str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    args.out.mkdir(parents=True, exist_ok=True)
    running = {folder: subprocess.Popen(command, env=env, stdout=(folder.parent / f"{folder.name}.log").open("w"),
                                        stderr=subprocess.STDOUT) for folder, command in jobs.items()}
    while True:
        codes = {folder.name: process.poll() for folder, process in running.items()}
        failed = [name for name, code in codes.items() if code not in (None, 0)]
        if failed:  # a tp arm would wait for a count that never comes: stop them all
            for process in running.values():
                process.kill()
            raise SystemExit(f"arms failed: {', '.join(failed)}; see their .log files in {args.out}")
        if None not in codes.values():
            break
        time.sleep(1.0)
    args.merge = list(jobs)
    return run_merge(args)


def main(argv: list[str] | None = None) -> None:
    global DEVICE
    args = parse_args(argv)
    DEVICE = resolve_device(args.device)
    if args.parallel and not args.merge:
        run_parallel(args)
    elif args.merge:
        run_merge(args)
    elif args.sweep is not None:
        run_sweep(args)
    else:
        if args.checkpoint is None:
            raise SystemExit("give the baseline checkpoint (or --sweep PLAN.yaml)")
        run_headline(args)


if __name__ == "__main__":
    main()
