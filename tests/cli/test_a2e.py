"""A2E end to end: credit-card data in the Kaggle layout -> train -> analyze/prune by layers -> score -> reload.

The data are generated (`tests/fakedata.write_creditcard`); the real recipe `recipes/a2e-creditcard.yaml` drives
every command, with its step counts cut down by options or by a copy of the recipe that changes only those.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import dnnprune
from dnnprune.checkpoint import CheckpointMeta, attach_meta
from dnnprune.cli import app
from dnnprune.data import dataset_targets
from dnnprune.loaders import splits_for, train_dataset
from dnnprune.models import create_model
from dnnprune.pruning.depth import units_fingerprint
from dnnprune.pruning.layers import find_units
from dnnprune.recipe import DataSection
from dnnprune.tasks import choose_threshold, make_task, sample_errors, threshold_metrics
from tests.cli.test_bad_input import _assert_clean_failure
from tests.conftest import make_checkpoint, needs_fmnist
from tests.fakedata import write_creditcard
from tests.reload import record_io, reload_in_new_process

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "a2e-creditcard.yaml"
UNITS = ["net.1", "net.3", "net.5", "net.7", "net.9"]
FEATURES = ["Time", *(f"V{i}" for i in range(1, 29)), "Amount"]


@dataclass
class Trained:
    root: Path
    data: Path
    checkpoint: Path
    analysis: Path
    pipeline: Path
    """The real recipe with its fine-tune step counts cut down (nothing else changed)."""
    quick: Path
    """The same without the recipe's target, for runs that say how much to remove on the command line."""
    train_report: dict[str, Any]
    analyze_output: str


def _invoke(runner: CliRunner, *args: Any) -> Any:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _quick_recipe(path: Path, keep_target: bool) -> Path:
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["prune"]["step_finetune"]["max_steps"] = 3
    recipe["prune"]["finetune"]["max_steps"] = 5
    if not keep_target:
        del recipe["prune"]["target"], recipe["prune"]["target_factor"]
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Train once (2 epochs of about 6 steps) and analyze once; the tests below read the results."""
    root = tmp_path_factory.mktemp("a2e")
    data = root / "data"
    write_creditcard(data / "creditcard.csv", rows=2000, fraud_rate=0.02, seed=0)
    runner = CliRunner()
    checkpoint = root / "a2e.safetensors"
    _invoke(runner, "train", "a2e", "-r", RECIPE, "--data-root", data, "-o", checkpoint, "--epochs", 2)
    analysis = root / "a2e.analysis.json"
    result = _invoke(runner, "analyze", checkpoint, "-r", RECIPE, "--data-root", data, "--granularity", "layer",
                     "-o", analysis)
    return Trained(root, data, checkpoint, analysis, _quick_recipe(root / "pipeline.yaml", keep_target=True),
                   _quick_recipe(root / "quick.yaml", keep_target=False),
                   json.loads(checkpoint.with_suffix(".json").read_text()), result.output)


def _section(trained: Trained) -> DataSection:
    recipe = yaml.safe_load(RECIPE.read_text())
    return DataSection(**recipe["data"], root=trained.data)


def _read_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [*FEATURES, "Class"]
    table = np.array(rows[1:])
    return table[:, :-1].astype(np.float64), table[:, -1].astype(np.int64)


# ----------------------------------------------------------------------------- data and training


def test_train_a2e_on_creditcard(trained: Trained) -> None:
    model = dnnprune.load(trained.checkpoint)
    meta = dnnprune.meta_of(model)
    assert (meta.arch, meta.dataset, tuple(meta.input_shape)) == ("a2e", "creditcard", (1, 1, 30))
    assert meta.task.kind == "reconstruction" and meta.task.normal_classes == (0,)
    assert meta.arch_args["widths"] == [64, 16, 64, 16, 64]
    report = trained.train_report
    losses = [epoch["train_loss"] for epoch in report["history"]["epochs"]]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert report["primary_metric"] == "roc_auc" and 0.5 < report["test"]["roc_auc"] <= 1.0
    assert report["train_samples"] == len(train_dataset(meta, _section(trained)))


def test_the_train_split_holds_only_normal_rows_and_every_split_keeps_frauds(trained: Trained) -> None:
    meta = dnnprune.meta_of(dnnprune.load(trained.checkpoint))
    section = _section(trained)
    splits = splits_for(meta, section)
    learned = dataset_targets(train_dataset(meta, section))
    whole_train = dataset_targets(splits.train)
    assert learned.numel() > 0 and set(learned.tolist()) == {0}
    assert learned.numel() == int((whole_train == 0).sum())  # every normal training row, and only those
    frauds = {name: int((dataset_targets(getattr(splits, name)) == 1).sum()) for name in ("train", "val", "test")}
    assert min(frauds.values()) >= 1 and sum(frauds.values()) == 40
    sizes = {name: len(getattr(splits, name)) for name in ("train", "val", "test")}
    for name in sizes:  # stratified: each split's fraud rate is the file's (2 %), to one row
        assert abs(frauds[name] - 0.02 * sizes[name]) <= 1, (frauds, sizes)


def test_standardisation_uses_train_statistics_only(trained: Trained) -> None:
    meta = dnnprune.meta_of(dnnprune.load(trained.checkpoint))
    splits = splits_for(meta, _section(trained))
    x, labels = _read_file(trained.data / "creditcard.csv")
    train_rows = np.asarray(splits.train.indices)
    mean, std = x[train_rows].mean(0), x[train_rows].std(0)
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        rows = np.asarray(split.indices)
        loaded = torch.stack([split[i][0] for i in range(len(split))]).reshape(len(split), 30).numpy()
        np.testing.assert_allclose(loaded, (x[rows] - mean) / std, rtol=1e-5, atol=1e-5)
        assert (dataset_targets(split).numpy() == labels[rows]).all()
    # Statistics of the whole file would give visibly different features: the check above can tell.
    val_rows = np.asarray(splits.val.indices)
    leaked = (x[val_rows] - x.mean(0)) / x.std(0)
    assert np.abs(leaked - (x[val_rows] - mean) / std).max() > 1e-3


def test_score_reports_anomaly_metrics_at_the_validation_threshold(runner: CliRunner, trained: Trained) -> None:
    report = trained.root / "a2e.score.json"
    result = runner.invoke(app, ["score", str(trained.checkpoint), "-r", str(RECIPE), "--data-root", str(trained.data),
                                 "--json", "--no-latency", "--report", str(report)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    metrics = printed["metrics"]
    assert json.loads(report.read_text())["metrics"] == metrics
    for key in ("roc_auc", "pr_auc", "threshold", "precision", "recall", "f1"):
        assert isinstance(metrics[key], float), key
    assert printed["primary_metric"] == "roc_auc" and printed["netscore"]["value"] is not None
    # The threshold is the best-F1 one on the validation split; precision/recall/F1 are measured on test.
    model = dnnprune.load(trained.checkpoint).eval()
    meta = dnnprune.meta_of(model)
    task = make_task(meta.task)
    splits = splits_for(meta, _section(trained))

    def errors(split: Any) -> tuple[np.ndarray, np.ndarray]:
        inputs = torch.stack([split[i][0] for i in range(len(split))])
        with torch.inference_mode():
            scores = sample_errors(model(inputs), inputs).double().numpy()
        return scores, (~task.is_normal(dataset_targets(split))).numpy()

    val_scores, val_anomalous = errors(splits.val)
    assert metrics["threshold"] == pytest.approx(choose_threshold(val_scores, val_anomalous), rel=1e-6)
    test_scores, test_anomalous = errors(splits.test)
    expected = threshold_metrics(test_scores, test_anomalous, metrics["threshold"])
    for key in ("precision", "recall", "f1"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-9), key
    assert metrics["samples"] == len(splits.test)


# ----------------------------------------------------------------------------- analyze and prune by layers


def test_layer_analysis_writes_one_cell_per_unit_an_order_and_the_fingerprint(trained: Trained) -> None:
    report = json.loads(trained.analysis.read_text())
    assert report["granularity"] == "layer" and report["primary_metric"] == "roc_auc"
    assert [layer["name"] for layer in report["layers"]] == UNITS
    for layer in report["layers"]:
        assert [cell["ratio"] for cell in layer["cells"]] == [1.0] and layer["type"] == "linear"
        assert layer["cells"][0]["roc_auc"] is not None
    assert sorted(report["order"]) == UNITS
    model = dnnprune.load(trained.checkpoint)
    assert report["model"]["fingerprint"] == units_fingerprint("a2e", find_units(model, (1, 1, 30)))
    csv_rows = trained.analysis.with_suffix(".csv").read_text().strip().splitlines()
    assert csv_rows[0].startswith("layer,ratio,removed,") and [r.split(",")[0] for r in csv_rows[1:]] == UNITS
    assert trained.analysis.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "order (least sensitive first)" in trained.analyze_output


def test_prune_remove_n_in_sensitivity_order(runner: CliRunner, trained: Trained, tmp_path: Path) -> None:
    out = tmp_path / "pruned.safetensors"
    order = json.loads(trained.analysis.read_text())["order"]
    result = runner.invoke(app, ["prune", str(trained.checkpoint), "-r", str(trained.quick), "--data-root",
                                 str(trained.data), "--granularity", "layer", "--remove", "2", "--one-shot",
                                 "--order", "sensitivity", "--analysis", str(trained.analysis), "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["mode"] == "layers" and report["layer_order"] == order
    # In the analysis' order, passing over a unit whose removal would now grow the model (a bottleneck).
    steps = report["steps"]
    assert steps[0]["unit"] == order[0] and len(steps) == 2 and all(s["accepted"] and s["unit_params"] > 0 for s in steps)
    assert order.index(steps[0]["unit"]) < order.index(steps[1]["unit"])
    assert {row["name"] for row in report["layers"] if row["removed"]} == {s["unit"] for s in steps}
    assert len(report["layers"]) == 5 and report["after"]["params"] == report["steps"][-1]["params"]
    model = dnnprune.load(out)
    assert len(find_units(model, (1, 1, 30))) == 3
    assert sum(p.numel() for p in model.parameters()) == report["after"]["params"] < report["before"]["params"]
    assert dnnprune.meta_of(model).lineage[-1]["command"] == "prune"


def test_prune_in_efficiency_order_takes_least_drop_per_parameter_saved(runner: CliRunner, trained: Trained,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(trained.checkpoint), "-r", str(trained.quick), "--data-root",
                                 str(trained.data), "--granularity", "layer", "--remove", "1", "--one-shot",
                                 "--order", "efficiency", "--analysis", str(trained.analysis), "-o", str(out)])
    assert result.exit_code == 0, result.output
    layers = json.loads(trained.analysis.read_text())["layers"]
    saving = {layer["name"]: layer["params"] for layer in layers}
    best = min((max(layer["sensitivity"], 1e-4) / layer["params"], layer["name"]) for layer in layers
               if saving[layer["name"]] > 0)[1]
    assert [s["unit"] for s in json.loads(out.with_suffix(".json").read_text())["steps"]] == [best]
    # Channels have no per-layer saving to rank by: the order is refused there, with the fix.
    again = tmp_path / "filter.safetensors"
    result = runner.invoke(app, ["prune", str(trained.checkpoint), "-r", str(trained.quick), "--data-root",
                                 str(trained.data), "--granularity", "filter", "--ratio", "0.5", "--order", "efficiency",
                                 "-o", str(again)])
    _assert_clean_failure(result, "--granularity layer")
    assert not again.exists()


def test_prune_to_a_params_target_stops_once_it_is_reached(runner: CliRunner, trained: Trained,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(trained.checkpoint), "-r", str(trained.quick), "--data-root",
                                 str(trained.data), "--granularity", "layer", "--target", "params:1.5", "--one-shot",
                                 "--order", "sequential", "-o", str(out), "--no-evaluate"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    base = report["before"]["params"]
    # net.1 alone gives 1.45x; net.3 would then widen the model (skipped, no row); net.5 reaches 2.15x.
    assert [s["unit"] for s in report["steps"]] == ["net.1", "net.5"]
    assert base / report["steps"][0]["params"] < 1.5 <= base / report["steps"][1]["params"]
    assert report["target"]["met"] and report["target"]["reached"] == pytest.approx(base / report["after"]["params"])


def test_accuracy_aware_puts_back_a_unit_over_budget(runner: CliRunner, trained: Trained, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A real run with tiny step fine-tunes, where the evaluation is made to punish removing `net.7`."""
    import dnnprune.pruning.command as command

    real = command.evaluate

    def punishing(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        metrics = real(model, *args, **kwargs)
        if isinstance(model.net[5], torch.nn.Identity) and metrics.values.get("roc_auc") is not None:
            metrics.values["roc_auc"] -= 0.3
        return metrics

    monkeypatch.setattr(command, "evaluate", punishing)
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(trained.checkpoint), "-r", str(trained.quick), "--data-root",
                                 str(trained.data), "--granularity", "layer", "--remove", "2", "--accuracy-aware",
                                 "--order", "reverse", "--max-accuracy-drop", "0.1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    steps = report["steps"]
    # net.7 and net.3 are passed over: with net.9 gone, removing either would grow the model.
    assert [(s["unit"], s["accepted"]) for s in steps] == [("net.9", True), ("net.5", False), ("net.1", True)]
    assert steps[1]["drop"] > 0.1 and "put back (drop over budget)" in result.output
    for step in steps:
        assert step["finetune_steps"] == 3 and step["accepted"] == (step["drop"] <= 0.1)
    assert [s["removed"] for s in steps] == [1, 1, 2]
    accepted = ["net.9", "net.1"]
    assert {row["name"] for row in report["layers"] if row["removed"]} == set(accepted)
    model = dnnprune.load(out)
    assert isinstance(model.net[5], torch.nn.Linear)  # put back
    assert all(isinstance(model.net[int(u.split(".")[1])], torch.nn.Identity) for u in accepted)


def test_refuses_a_filter_analysis_or_one_for_another_model(runner: CliRunner, trained: Trained,
                                                            tmp_path: Path) -> None:
    filter_analysis = tmp_path / "filter.analysis.json"
    _invoke(runner, "analyze", trained.checkpoint, "-r", RECIPE, "--data-root", trained.data, "--granularity",
            "filter", "--ratios", "0.5", "--samples", 100, "-o", filter_analysis)
    out = tmp_path / "pruned.safetensors"
    args = ["prune", str(trained.checkpoint), "-r", str(trained.quick), "--data-root", str(trained.data),
            "--granularity", "layer", "--remove", "1", "--order", "sensitivity", "-o", str(out)]
    _assert_clean_failure(runner.invoke(app, [*args, "--analysis", str(filter_analysis)]), "not a layer analysis")
    other = _a2e_checkpoint(tmp_path / "other.safetensors", widths=[32, 8, 32])
    args[1] = str(other)
    _assert_clean_failure(runner.invoke(app, [*args, "--analysis", str(trained.analysis)]), "another model")
    assert not out.exists() and not out.with_suffix(".json").exists()


def _a2e_checkpoint(path: Path, widths: list[int]) -> Path:
    args = {"input_shape": [1, 1, 30], "widths": widths, "activation": "tanh", "in_channels": 1}
    meta = CheckpointMeta(arch="a2e", arch_args=args, input_shape=(1, 1, 30), dataset="creditcard",
                          classes=["0", "1"], task={"kind": "reconstruction", "normal_classes": [0]})
    return dnnprune.save(attach_meta(create_model("a2e", **args), meta), path)


def test_the_recipe_pipeline_prune_score_and_reload(runner: CliRunner, trained: Trained, tmp_path: Path) -> None:
    """The recipe's own prune section (accuracy-aware, to 6.7x fewer parameters), with short fine-tunes."""
    out = tmp_path / "a2e-pruned.safetensors"
    _invoke(runner, "prune", trained.checkpoint, "-r", trained.pipeline, "--data-root", trained.data,
            "--analysis", trained.analysis, "-o", out)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["accuracy_aware"] and report["target"]["metric"] == "params"
    assert report["steps"] and all("val" in s and "drop" in s for s in report["steps"])
    # 6.7x (the paper's 85.1 % less complexity) needs the bottleneck layers, which only shrink the model
    # once their wide neighbours are gone: the loop comes back to them.
    assert report["target"]["met"] and report["target"]["reached"] >= 6.7
    assert {"net.3", "net.9"} <= {s["unit"] for s in report["steps"] if s["accepted"]}
    assert report["after"]["params"] < report["before"]["params"]
    score_path = tmp_path / "pruned.score.json"
    _invoke(runner, "score", out, "-r", RECIPE, "--data-root", trained.data, "--no-latency", "--report", score_path)
    metrics = json.loads(score_path.read_text())["metrics"]
    assert 0.5 < metrics["roc_auc"] <= 1.0 and metrics["pr_auc"] is not None
    model = dnnprune.load(out)
    assert sum(p.numel() for p in model.parameters()) == report["after"]["params"]
    assert all(reload_in_new_process([record_io(model, out, (1, 1, 30), batch=8)]).values())


# ----------------------------------------------------------------------------- bad input


def _write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([",".join(f'"{h}"' for h in header), *(",".join(r) for r in rows)]) + "\n")
    return path


@pytest.mark.parametrize("case, fragment", [
    ("no-label", "no label column 'Class'"),
    ("one-class", "holds one class only"),
    ("too-few-frauds", "too few to put one in"),
])
def test_bad_creditcard_files(runner: CliRunner, tmp_path: Path, case: str, fragment: str) -> None:
    data = tmp_path / "data" / "creditcard.csv"
    rng = np.random.default_rng(0)
    values = [[f"{v:.4f}" for v in row] for row in rng.normal(size=(60, 30))]
    if case == "no-label":
        _write_rows(data, FEATURES, values)
    else:
        labels = ['"0"'] * 60
        if case == "too-few-frauds":
            labels[3] = labels[7] = '"1"'  # two frauds cannot reach train, val and test
        _write_rows(data, [*FEATURES, "Class"], [row + [label] for row, label in zip(values, labels)])
    out = tmp_path / "a2e.safetensors"
    result = runner.invoke(app, ["train", "a2e", "-r", str(RECIPE), "--data-root", str(data.parent), "-o", str(out),
                                 "--max-steps", "1"])
    _assert_clean_failure(result, fragment)
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.parametrize("options, fragment", [
    (["--remove", "6"], "more than the 5 removable units"),
    (["--target", "params:20"], "lower the target"),
    (["--target", "bytes:2"], "params:F or macs:F"),
    (["--remove", "1", "--ratio", "0.5"], "are for channels"),
])
def test_unreachable_layer_requests(runner: CliRunner, trained: Trained, tmp_path: Path, options: list[str],
                                    fragment: str) -> None:
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(trained.checkpoint), "-r", str(trained.quick), "--data-root",
                                 str(trained.data), "--granularity", "layer", "-o", str(out), *options])
    _assert_clean_failure(result, fragment)
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_layer_granularity_on_a_model_without_units(runner: CliRunner, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "mlp.safetensors", "mlp", hidden=[])
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(checkpoint), "--granularity", "layer", "--remove", "1", "-o", str(out)])
    _assert_clean_failure(result, "no removable unit", "--granularity filter")
    assert not out.exists() and not out.with_suffix(".json").exists()
    analysis = tmp_path / "mlp.analysis.json"
    result = runner.invoke(app, ["analyze", str(checkpoint), "--granularity", "layer", "-o", str(analysis)])
    _assert_clean_failure(result, "--granularity filter")
    assert not any(analysis.with_suffix(s).exists() for s in (".json", ".csv", ".png"))


# ----------------------------------------------------------------------------- generative classifier


@needs_fmnist
def test_a2e_classifier_trains_and_its_logits_are_minus_reconstruction_errors(runner: CliRunner,
                                                                             tmp_path: Path) -> None:
    recipe = tmp_path / "a2e-classifier.yaml"
    recipe.write_text("model:\n  args:\n    widths: [16, 8, 16]\n    activation: relu\n"
                      "data:\n  dataset: fashion-mnist\n  train_limit: 300\n"
                      "train:\n  epochs: 3\n  batch_size: 32\n  optimizer: adam\n  lr: 0.003\n  weight_decay: 0.0\n"
                      "  schedule: constant\n")
    out = tmp_path / "classifier.safetensors"
    _invoke(runner, "train", "a2e_classifier", "-r", recipe, "-o", out)
    losses = [epoch["train_loss"] for epoch in json.loads(out.with_suffix(".json").read_text())["history"]["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0] * 0.8
    model = dnnprune.load(out).eval()
    assert len(model.experts) == 10 and model.experts[0][1].out_features == 16
    x = torch.rand(5, 1, 28, 28)
    with torch.inference_mode():
        errors = torch.stack([(expert(x) - x.flatten(1)).pow(2).mean(1) for expert in model.experts], 1)
        torch.testing.assert_close(model(x), -errors * model.log_scale.exp())
    assert len(find_units(model, (1, 28, 28))) == 30  # 3 hidden Linears per class


def test_removing_blocks_needs_no_data(runner: CliRunner, tmp_path: Path) -> None:
    """Like channel pruning, one-shot removal of blocks without evaluation reads no data at all."""
    checkpoint = make_checkpoint(tmp_path / "resnet20.safetensors", "resnet20", input_shape=(1, 32, 32))
    empty = tmp_path / "no-data"
    empty.mkdir()
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(checkpoint), "--granularity", "layer", "--remove", "2", "--order",
                                 "reverse", "--no-evaluate", "--data-root", str(empty), "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert [s["unit"] for s in report["steps"]] == ["layer3.2", "layer3.1"] and report["after"]["val"] is None
    model = dnnprune.load(out)
    assert isinstance(model.layer3[2], torch.nn.Identity) and len(find_units(model, (1, 32, 32))) == 7
    # Measuring the order needs the validation split: then a missing dataset is the usual one-line error.
    again = tmp_path / "again.safetensors"
    result = runner.invoke(app, ["prune", str(checkpoint), "--granularity", "layer", "--remove", "2", "--order",
                                 "sensitivity", "--no-evaluate", "--data-root", str(empty), "-o", str(again)])
    _assert_clean_failure(result, "not found")
    assert not again.exists()


@needs_fmnist
def test_shared_a2e_classifier_trains_layer_prunes_and_reloads(runner: CliRunner, tmp_path: Path) -> None:
    """The shared design (one accordion encoder, a head on the code) through train, layer analysis and
    accuracy-ordered removal; the bridged model rebuilds from its metadata in a new process."""
    recipe = tmp_path / "a2e-shared.yaml"
    recipe.write_text("model:\n  args:\n    widths: [32, 8, 32, 8]\n    design: shared\n"
                      "data:\n  dataset: fashion-mnist\n  train_limit: 300\n"
                      "train:\n  epochs: 2\n  batch_size: 32\n  optimizer: adam\n  lr: 0.003\n  weight_decay: 0.0\n"
                      "analyze:\n  granularity: layer\n  samples: 200\n"
                      "prune:\n  granularity: layer\n  remove: 2\n  order: sensitivity\n")
    out = tmp_path / "shared.safetensors"
    _invoke(runner, "train", "a2e_classifier", "-r", recipe, "-o", out)
    analysis = tmp_path / "shared.analysis.json"
    _invoke(runner, "analyze", out, "-r", recipe, "-o", analysis)
    assert sorted(json.loads(analysis.read_text())["order"]) == ["net.1", "net.3", "net.5", "net.7"]
    pruned = tmp_path / "shared-pruned.safetensors"
    _invoke(runner, "prune", out, "-r", recipe, "--analysis", analysis, "-o", pruned)
    report = json.loads(pruned.with_suffix(".json").read_text())
    assert len(report["steps"]) == 2 and report["after"]["params"] < report["before"]["params"]
    model = dnnprune.load(pruned).eval()
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 3
    assert reload_in_new_process([record_io(model, pruned, (1, 28, 28))]) == {str(pruned): True}


def test_the_layer_analysis_never_suggests_a_unit_whose_removal_grows_the_model(trained: Trained) -> None:
    """On the 64-16-64-16-64 accordion, removing a 16-wide bottleneck bridges two 64-wide layers with a
    larger one: however little it costs, it is not suggested, and the table says it grows."""
    layers = {layer["name"]: layer for layer in json.loads(trained.analysis.read_text())["layers"]}
    assert layers["net.3"]["params"] < 0 and layers["net.7"]["params"] < 0
    assert layers["net.3"]["suggested_ratio"] == 0 and layers["net.7"]["suggested_ratio"] == 0
    assert "grows" in trained.analyze_output and "saves params %" in trained.analyze_output


def test_a_count_that_only_growing_units_could_fill_is_reported_short(runner: CliRunner, trained: Trained,
                                                                       tmp_path: Path) -> None:
    """`--remove 3` on a 16-4-16 accordion removes two units: its bottleneck always grows the model. It said
    nothing before."""
    from dnnprune.checkpoint import CheckpointMeta, attach_meta, save
    from dnnprune.models import create_model
    from dnnprune.tasks import TaskSpec

    args = {"input_shape": [1, 1, 30], "widths": [16, 4, 16]}
    torch.manual_seed(0)
    model = attach_meta(create_model("a2e", **args),
                        CheckpointMeta(arch="a2e", arch_args=args, input_shape=(1, 1, 30), dataset="creditcard",
                                       task=TaskSpec(kind="reconstruction", normal_classes=(0,))))
    checkpoint = save(model, tmp_path / "narrow.safetensors")
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(checkpoint), "--data-root", str(trained.data), "--granularity", "layer",
                                 "--remove", "3", "--one-shot", "--order", "reverse", "--no-evaluate", "-o", str(out)])
    assert result.exit_code == 0, result.output
    steps = json.loads(out.with_suffix(".json").read_text())["steps"]
    assert [step["unit"] for step in steps if step["accepted"]] == ["net.5", "net.1"]
    assert "removed 2 of the 3 units asked: every unit left would have grown the model" in result.output


# ----------------------------------------------------------------------------- the stored anomaly threshold


def _val_threshold(model: torch.nn.Module, trained: Trained) -> float:
    """The best-F1 threshold on the validation split, computed here from the model's own errors."""
    meta = dnnprune.meta_of(model)
    task = make_task(meta.task)
    split = splits_for(meta, _section(trained)).val
    inputs = torch.stack([split[i][0] for i in range(len(split))])
    with torch.inference_mode():
        scores = sample_errors(model.eval()(inputs), inputs).double().numpy()
    return choose_threshold(scores, (~task.is_normal(dataset_targets(split))).numpy())


def _score(runner: CliRunner, checkpoint: Path, data: Path, report: Path, *options: str) -> dict[str, Any]:
    _invoke(runner, "score", checkpoint, "-r", RECIPE, "--data-root", data, "--no-latency", "--report", report, *options)
    return json.loads(report.read_text())


def test_train_stores_the_validation_threshold_and_score_and_info_use_it(runner: CliRunner, trained: Trained,
                                                                         tmp_path: Path) -> None:
    model = dnnprune.load(trained.checkpoint)
    held = dnnprune.meta_of(model).anomaly_threshold
    assert held is not None and held.value == pytest.approx(_val_threshold(model, trained), rel=1e-6)
    assert "val split of creditcard" in held.chosen_on and held.samples == len(splits_for(
        dnnprune.meta_of(model), _section(trained)).val) and 0 < held.f1 <= 1
    scored = _score(runner, trained.checkpoint, trained.data, tmp_path / "s.json")
    assert scored["metrics"]["threshold"] == held.value and scored["threshold_source"].startswith("the checkpoint's")
    info = json.loads(_invoke(runner, "info", trained.checkpoint, "--json").stdout)
    assert info["anomaly_threshold"]["value"] == held.value
    shown = _invoke(runner, "info", trained.checkpoint).stdout
    assert "anomaly threshold" in shown and "best F1 for anomalies" in shown and "that group's val F1" in shown
    assert "F1 (finding anomalies)" in _invoke(runner, "score", trained.checkpoint, "-r", RECIPE, "--data-root",
                                              trained.data, "--no-latency", "--report", tmp_path / "t.json").stdout


def test_a_hold_out_file_is_scored_at_the_stored_threshold_not_one_chosen_on_its_labels(
        runner: CliRunner, trained: Trained, tmp_path: Path) -> None:
    """`--split all` on a file of one's own: choosing the threshold on that file's val rows would use
    the labels being scored (it did, before the threshold was stored)."""
    holdout = tmp_path / "holdout"
    write_creditcard(holdout / "creditcard.csv", rows=1200, fraud_rate=0.05, seed=7)
    held = dnnprune.meta_of(dnnprune.load(trained.checkpoint)).anomaly_threshold
    scored = _score(runner, trained.checkpoint, holdout, tmp_path / "all.json", "--split", "all")
    assert scored["metrics"]["samples"] == 1200 and scored["metrics"]["threshold"] == held.value
    # The file's own best-F1 threshold is another number: the check above can tell the two apart.
    model = dnnprune.load(trained.checkpoint).eval()
    x, labels = _read_file(holdout / "creditcard.csv")
    meta = dnnprune.meta_of(model)
    scaled = (x - np.array(meta.feature_mean)) / np.array(meta.feature_std)
    inputs = torch.tensor(scaled, dtype=torch.float32).reshape(-1, 1, 1, 30)
    with torch.inference_mode():
        scores = sample_errors(model(inputs), inputs).double().numpy()
    assert choose_threshold(scores, labels == 1) != pytest.approx(held.value, rel=1e-3)
    expected = threshold_metrics(scores, labels == 1, held.value)
    assert scored["metrics"]["f1"] == pytest.approx(expected["f1"], rel=1e-6)


def test_a_checkpoint_without_a_threshold_chooses_one_on_val_and_never_on_the_scored_samples(
        runner: CliRunner, trained: Trained, tmp_path: Path) -> None:
    model = dnnprune.load(trained.checkpoint)
    dnnprune.meta_of(model).anomaly_threshold = None  # as a checkpoint written before thresholds were stored
    older = tmp_path / "older.safetensors"
    dnnprune.save(model, older)
    test = _score(runner, older, trained.data, tmp_path / "test.json")
    assert test["metrics"]["threshold"] == pytest.approx(_val_threshold(model, trained), rel=1e-6)
    assert test["threshold_source"].startswith("chosen now")
    every = _score(runner, older, trained.data, tmp_path / "all.json", "--split", "all")
    assert "threshold" not in every["metrics"] and "f1" not in every["metrics"]
    assert every["threshold_source"].startswith("none") and every["metrics"]["roc_auc"] is not None


def test_pruning_chooses_the_threshold_again_and_export_carries_it(runner: CliRunner, trained: Trained,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "pruned.safetensors"
    _invoke(runner, "prune", trained.checkpoint, "-r", trained.quick, "--data-root", trained.data, "--analysis",
            trained.analysis, "--remove", "1", "-o", out)
    pruned = dnnprune.load(out)
    parent = dnnprune.meta_of(dnnprune.load(trained.checkpoint)).anomaly_threshold
    held = dnnprune.meta_of(pruned).anomaly_threshold
    assert held is not None and held.value == pytest.approx(_val_threshold(pruned, trained), rel=1e-6)
    assert held.value != parent.value
    import onnx

    onnx_path = tmp_path / "pruned.onnx"
    _invoke(runner, "export", out, "-o", onnx_path)
    described = json.loads({p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}["dnnprune"])
    assert described["anomaly_threshold"]["value"] == held.value and "above" in described["anomaly_threshold"]["rule"]


def test_a_detector_compressed_without_its_data_drops_its_stale_threshold(runner: CliRunner, trained: Trained,
                                                                          tmp_path: Path) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    out = tmp_path / "quantized.safetensors"
    result = _invoke(runner, "quantize", trained.checkpoint, "--bits", "8", "--no-evaluate", "--data-root", empty,
                     "-o", out)
    assert "the anomaly threshold was dropped" in result.output and "creditcard not found" in result.output
    assert dnnprune.meta_of(dnnprune.load(out)).anomaly_threshold is None
    assert "none stored" in _invoke(runner, "info", out).stdout


def test_a_threshold_on_a_classifier_checkpoint_is_refused(tmp_path: Path) -> None:
    from dnnprune.checkpoint import AnomalyThreshold
    from dnnprune.errors import CheckpointError

    meta = dnnprune.meta_of(dnnprune.load(make_checkpoint(tmp_path / "lenet.safetensors")))
    with pytest.raises(CheckpointError, match="not anomaly detection"):
        CheckpointMeta(**{**meta.model_dump(), "anomaly_threshold": AnomalyThreshold(value=1.0, chosen_on="x",
                                                                                     samples=1)})
    detector = {**meta.model_dump(), "task": {"kind": "reconstruction", "normal_classes": [0]}}
    assert CheckpointMeta(**{**detector, "anomaly_threshold": {"value": 0.5, "chosen_on": "x", "samples": 1}})
    with pytest.raises(CheckpointError, match="anomaly_threshold"):
        CheckpointMeta(**{**detector, "anomaly_threshold": {"value": float("nan"), "chosen_on": "x", "samples": 1}})


def test_a_small_holdout_or_one_of_normal_rows_only_is_scored_whole(runner: CliRunner, trained: Trained,
                                                                   tmp_path: Path) -> None:
    """60 rows with 3 frauds cannot be split three ways with a fraud in each part, and a file of normal
    rows has one class: both were refused; scored whole at the stored threshold, the second reports how
    many normal rows the detector flags."""
    small = tmp_path / "small"
    write_creditcard(small / "creditcard.csv", rows=60, fraud_rate=0.05, seed=3)
    scored = _score(runner, trained.checkpoint, small, tmp_path / "small.json", "--split", "all")
    assert scored["metrics"]["samples"] == 60 and scored["metrics"]["roc_auc"] is not None
    header, *rows = (small / "creditcard.csv").read_text().splitlines()
    normal = tmp_path / "normal"
    normal.mkdir()
    kept = [row for row in rows if row.endswith('"0"')]
    (normal / "creditcard.csv").write_text("\n".join([header, *kept]) + "\n")
    only = _score(runner, trained.checkpoint, normal, tmp_path / "normal.json", "--split", "all")
    metrics = only["metrics"]
    assert metrics["samples"] == len(kept) and metrics.get("roc_auc") is None and metrics["anomaly_rate"] == 0.0
    held = dnnprune.meta_of(dnnprune.load(trained.checkpoint)).anomaly_threshold
    x, _ = _read_file(normal / "creditcard.csv")
    model = dnnprune.load(trained.checkpoint)
    meta = dnnprune.meta_of(model)
    inputs = torch.tensor((x - np.array(meta.feature_mean)) / np.array(meta.feature_std), dtype=torch.float32)
    with torch.inference_mode():
        errors = sample_errors(model(inputs.reshape(-1, 1, 1, 30)), inputs.reshape(-1, 1, 1, 30)).double().numpy()
    assert metrics["false_positive_rate"] == pytest.approx(float((errors > held.value).mean()))
    split = runner.invoke(app, ["score", str(trained.checkpoint), "-r", str(RECIPE), "--data-root", str(normal),
                                "--no-latency", "--report", str(tmp_path / "t.json")])
    _assert_clean_failure(split, "holds one class only")  # a test split of it would have nothing to detect
