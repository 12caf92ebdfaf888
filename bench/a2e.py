"""Benchmark: accordion autoencoders (A2E) pruned by out-of-order layer removal, against controls.

Three settings, each: train the accordion baseline; run `analyze --granularity layer` and an
accuracy-aware `prune --granularity layer` to the target; train a control (the same baseline
fine-tuned for exactly as many steps as the pruned model received: its accepted step fine-tunes plus
the final fine-tune); score all three on the test split; reload the pruned checkpoint in a new process
and check its outputs.

- `anomaly-fmnist`: Fashion-MNIST one-class-vs-rest (one class normal, the other nine anomalies),
  a standard deep anomaly-detection benchmark; per class ROC-AUC and PR-AUC;
- `classify-fmnist`: `a2e_classifier`, one accordion per class, generative classification;
- `classify-shared-fmnist`: `a2e_classifier` with `design: shared`, one accordion encoder and a head;
- `anomaly-csv`: a tabular file with a label column (Statlog Shuttle from Debian's r-cran-mlbench,
  ODDS layout: class 1 normal, 2/3/5/6/7 anomalies, class 4 dropped; or Kaggle's creditcard.csv).

    python bench/a2e.py anomaly-fmnist --classes 0,1,2 --out runs/bench/a2e
    python bench/a2e.py classify-fmnist --out runs/bench/a2e
    python bench/a2e.py classify-shared-fmnist --out runs/bench/a2e
    python bench/a2e.py anomaly-csv --csv runs/cache/shuttle.csv --normal 0 --out runs/bench/a2e
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import dnnprune
from dnnprune.analysis import analyze, write_outputs
from dnnprune.checkpoint import meta_of, save
from dnnprune.fresh import new_model
from dnnprune.loaders import eval_loader, train_loader
from dnnprune.metrics import count_macs, count_parameters
from dnnprune.pruning import prune
from dnnprune.recipe import (
    AnalyzeSection,
    DataSection,
    FineTuneSection,
    ModelSection,
    PruneSection,
    ScoreSection,
    TrainSection,
)
from dnnprune.scoring import score
from dnnprune.tasks import TaskSpec, make_task
from dnnprune.training import evaluate, fit_loop, frozen_teacher, train

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setting", choices=list(SETTINGS))
    parser.add_argument("--classes", default="0", help="anomaly-fmnist: the normal classes to run, one run each")
    parser.add_argument("--csv", type=Path, help="anomaly-csv: the file")
    parser.add_argument("--label-column", default="Class")
    parser.add_argument("--normal", default="0", help="anomaly-csv: normal class indices (after sorting the labels)")
    parser.add_argument("--widths", default=None, help="accordion widths, comma-separated")
    parser.add_argument("--activation", default=None)
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--target", type=float, default=None, help="params reduction factor")
    parser.add_argument("--budget", type=float, default=0.02)
    parser.add_argument("--step-steps", type=int, default=None, help="fine-tune steps after each removal")
    parser.add_argument("--final-steps", type=int, default=None)
    parser.add_argument("--order", choices=["sensitivity", "efficiency"], default=None,
                        help="layer removal order (efficiency: least drop per parameter saved)")
    parser.add_argument("--distill", type=float, default=None, help="distillation weight of every fine-tune")
    parser.add_argument("--split", choices=["val", "test"], default="test",
                        help="val for choosing settings; test for the final rows only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench/a2e")
    return parser.parse_args(argv)


SETTINGS: dict[str, dict[str, Any]] = {
    "anomaly-fmnist": {"arch": "a2e", "widths": [256, 32, 256, 32, 256], "activation": "relu", "epochs": 10,
                       "target": 7.0, "step_steps": 100, "final_steps": 300, "batch": 128, "lr": 1e-3},
    "classify-fmnist": {"arch": "a2e_classifier", "widths": [256, 16, 256, 16, 256], "activation": "relu",
                        "epochs": 3, "target": 10.5, "step_steps": 100, "final_steps": 300, "batch": 128, "lr": 1e-3},
    "anomaly-csv": {"arch": "a2e", "widths": [64, 8, 64, 8, 64], "activation": "tanh", "epochs": 20,
                    "target": 7.0, "step_steps": 200, "final_steps": 500, "batch": 256, "lr": 1e-3},
    # Chosen on the validation split (BENCHMARKS.md): a narrow input layer, so the wide expansions are
    # what layer pruning takes away; efficiency order; longer fine-tunes than the per-class design's.
    "classify-shared-fmnist": {"arch": "a2e_classifier", "design": "shared", "widths": [256, 2048, 256, 2048, 256],
                               "activation": "relu", "epochs": 10, "target": 10.5, "step_steps": 300,
                               "final_steps": 1000, "batch": 128, "lr": 1e-3, "order": "efficiency"},
}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    chosen = dict(SETTINGS[args.setting])
    for key in ("epochs", "target", "activation", "distill", "order"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    if args.widths:
        chosen["widths"] = [int(w) for w in args.widths.split(",")]
    if args.step_steps is not None:
        chosen["step_steps"] = args.step_steps
    if args.final_steps is not None:
        chosen["final_steps"] = args.final_steps
    return chosen


def optimizer_section(steps: int, chosen: dict[str, Any]) -> FineTuneSection:
    return FineTuneSection(max_steps=steps, lr=chosen["lr"], batch_size=chosen["batch"], optimizer="adam",
                           weight_decay=0.0, schedule="cosine", distill=chosen.get("distill", 0.0))


def one_run(name: str, data: DataSection, task: TaskSpec | None, chosen: dict[str, Any], args: argparse.Namespace,
            out: Path) -> dict[str, Any]:
    """Baseline, layer analysis, accuracy-aware layer pruning, control, scores, reload check."""
    started = time.perf_counter()
    model_args = {"widths": chosen["widths"], "activation": chosen["activation"]}
    if "design" in chosen:
        model_args["design"] = chosen["design"]
    model_section = ModelSection(arch=chosen["arch"], args=model_args, task=task)
    model = new_model(chosen["arch"], model_section, data, args.seed)
    model, trained = train(model, TrainSection(epochs=chosen["epochs"], batch_size=chosen["batch"], optimizer="adam",
                                               lr=chosen["lr"], weight_decay=0.0, schedule="cosine", seed=args.seed,
                                               eval_every_epoch=False), data=data)
    baseline_path = save(model, out / f"{name}-baseline.safetensors", force=True)
    _, analysis = analyze(dnnprune.load(baseline_path), AnalyzeSection(granularity="layer", samples=None,
                                                                       budget=args.budget), data=data)
    analysis_path = out / f"{name}-baseline.analysis.json"
    write_outputs(analysis, analysis_path)
    section = PruneSection(granularity="layer", order=chosen.get("order", "sensitivity"), analysis=analysis_path, target="params",
                           target_factor=chosen["target"], accuracy_aware=True, max_accuracy_drop=args.budget,
                           step_finetune=optimizer_section(chosen["step_steps"], chosen),
                           finetune=optimizer_section(chosen["final_steps"], chosen),
                           seed=args.seed)
    pruned, report = prune(dnnprune.load(baseline_path), section, data=data)
    pruned_path = save(pruned, out / f"{name}-pruned.safetensors", force=True)
    steps = sum(row.get("finetune_steps", 0) for row in report.steps if row["accepted"])
    steps += (report.final_finetune or {}).get("steps", 0) if (report.final_finetune or {}).get("kept", True) else 0
    control = dnnprune.load(baseline_path)
    if steps:
        config = optimizer_section(steps, chosen)
        teacher = frozen_teacher(dnnprune.load(baseline_path), config)
        fit_loop(control, train_loader(meta_of(control), data, config.batch_size, args.seed), config,
                 device=torch.device("cpu"), seed=args.seed, teacher=teacher)
    rows = {label: _scored(m, data, path, args.split) for label, m, path in
            (("baseline", dnnprune.load(baseline_path), baseline_path), ("control", control, None),
             ("pruned", dnnprune.load(pruned_path), pruned_path))}
    return {"name": name, "widths": chosen["widths"], "activation": chosen["activation"],
            "baseline_train_steps": trained.history["steps"], "control_steps": steps, "rows": rows,
            "removed": [row["unit"] for row in report.steps if row["accepted"]], "order": analysis.order,
            "steps": report.steps, "final_finetune": report.final_finetune,
            "params_reduction": 1 - rows["pruned"]["params"] / rows["baseline"]["params"],
            "macs_reduction": 1 - rows["pruned"]["macs"] / rows["baseline"]["macs"],
            "reloads_identically": reload_check(pruned_path), "seconds": time.perf_counter() - started}


def _scored(model: torch.nn.Module, data: DataSection, path: Path | None, split: str) -> dict[str, Any]:
    """`score`'s metrics on test; on val (choosing settings), the task's metrics from `evaluate`."""
    meta = meta_of(model)
    sizes = {"params": count_parameters(model), "macs": sum(count_macs(model, tuple(meta.input_shape)).values())}
    if split == "val":
        task = make_task(meta.task)
        result = evaluate(model, eval_loader(meta, data, split="val"), "cpu", task=task)
        return {**result.values, **sizes, "split": "val"}
    _, report = score(model, ScoreSection(latency=False), data=data, checkpoint_path=path)
    return {**report.metrics, **sizes, "disk_bytes": report.disk_bytes, "split": "test"}


_RELOAD = """
import sys, torch, dnnprune
model = dnnprune.load(sys.argv[1])
x = torch.load(sys.argv[2], weights_only=True)
with torch.inference_mode():
    print(bool(torch.equal(model(x["input"]), x["output"])))
"""


def reload_check(path: Path) -> bool:
    """The pruned checkpoint rebuilt in a fresh interpreter gives bit-identical outputs."""
    model = dnnprune.load(path)
    sample = torch.randn(4, *meta_of(model).input_shape)
    with torch.inference_mode():
        io = {"input": sample, "output": model(sample)}
    io_path = path.with_suffix(".io.pt")
    torch.save(io, io_path)
    done = subprocess.run([sys.executable, "-c", _RELOAD, str(path), str(io_path)], capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip().endswith("True")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    chosen = settings(args)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    if args.setting == "anomaly-fmnist":
        for k in [int(c) for c in args.classes.split(",")]:
            task = TaskSpec(kind="reconstruction", normal_classes=(k,))
            results.append(one_run(f"fmnist-normal{k}", DataSection(dataset="fashion-mnist"), task, chosen, args, args.out))
            _write(args, results)
    elif args.setting.startswith("classify"):
        results.append(one_run("fmnist-classifier", DataSection(dataset="fashion-mnist"), None, chosen, args, args.out))
    else:
        normal = tuple(int(c) for c in args.normal.split(","))
        data = DataSection(dataset="csv", path=args.csv, label_column=args.label_column, batch_size=2048)
        task = TaskSpec(kind="reconstruction", normal_classes=normal)
        results.append(one_run(args.csv.stem, data, task, chosen, args, args.out))
    _write(args, results)


def _write(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    path = args.out / f"{args.setting}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), "settings": settings(args), "results": results},
                               indent=2, default=str))
    for result in results:
        rows = result["rows"]
        keys = [k for k in ("roc_auc", "pr_auc", "top1", "f1") if rows["baseline"].get(k) is not None]
        print(result["name"], {label: {k: round(row[k], 4) for k in (*keys, "params", "macs")}
                               for label, row in rows.items()},
              f"params -{result['params_reduction']:.1%} MACs -{result['macs_reduction']:.1%}", flush=True)


if __name__ == "__main__":
    main()
