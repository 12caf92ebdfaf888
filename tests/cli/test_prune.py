"""`dnnprune prune` end to end: real files in, a smaller checkpoint and a report out; bad input fails cleanly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

import dnnprune
from dnnprune.cli import app
from dnnprune.surgery import ChannelGraph, model_fingerprint
from tests.cli.test_bad_input import _assert_clean_failure
from tests.conftest import make_checkpoint, needs_fmnist, unchecked_saves


@pytest.fixture
def resnet_checkpoint(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "resnet20.safetensors", "resnet20", input_shape=(1, 32, 32))


def _write_analysis(path: Path, checkpoint: Path, order_reversed: bool = True,
                    suggested: dict[str, float] | None = None) -> Path:
    model = dnnprune.load(checkpoint)
    meta = dnnprune.meta_of(model)
    graph = ChannelGraph(model, meta.input_shape)
    names = [g.name for g in graph.groups]
    path.write_text(json.dumps({
        "command": "analyze",
        "model": {"arch": meta.arch, "fingerprint": model_fingerprint(meta.arch, graph),
                  "groups": [[g.name, g.width] for g in graph.all_groups]},
        "layers": [{"name": n, "suggested_ratio": r} for n, r in (suggested or {}).items()],
        "order": names[::-1] if order_reversed else names, "baseline": {"top1": 0.1, "loss": 2.3},
        "criterion": "l1", "ratios": [0.5], "samples": 100, "granularity": "filter"}))
    return path


def test_prune_without_data_writes_a_smaller_checkpoint_and_report(runner: CliRunner, tmp_path: Path,
                                                                  resnet_checkpoint: Path) -> None:
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(resnet_checkpoint), "-o", str(out), "--ratio", "0.5", "--no-evaluate",
                                 "--exclude", "layer3.2.conv1"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["command"] == "prune" and report["reduction"]["macs"] > 3.0
    assert report["before"]["val"] is None and report["seconds"]["total"] > 0
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["conv1"]["width_before"] == 16 and rows["conv1"]["width_after"] == 8
    assert rows["layer3.2.conv1"]["width_after"] == 64 and rows["layer3.2.conv1"]["excluded"]
    model = dnnprune.load(out)
    assert dnnprune.meta_of(model).lineage[-1].command == "prune"
    assert model.conv1.out_channels == 8


def test_prune_reports_latency_on_the_fused_runtime(runner: CliRunner, tmp_path: Path,
                                                    resnet_checkpoint: Path) -> None:
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(resnet_checkpoint), "-o", str(out), "--ratio", "0.5", "--no-evaluate",
                                 "--report-latency", "--latency-runtime", "fused"])
    assert result.exit_code == 0, result.output
    latency = json.loads(out.with_suffix(".json").read_text())["latency"]
    assert latency["runtime"] == "fused" and [r["batch_size"] for r in latency["rows"]] == [1, 64]
    assert all(r["before_ms"] > 0 and r["after_ms"] > 0 for r in latency["rows"])
    assert "(fused)" in result.output


def test_prune_to_a_measured_speedup_says_what_it_measured(runner: CliRunner, tmp_path: Path,
                                                           resnet_checkpoint: Path) -> None:
    out = tmp_path / "pruned.safetensors"
    recipe = tmp_path / "fast.yaml"
    recipe.write_text("prune:\n  latency_batch: 8\n  latency_repeats: 5\n")
    result = runner.invoke(app, ["prune", str(resnet_checkpoint), "-r", str(recipe), "-o", str(out), "--target",
                                 "latency:1.3", "--no-evaluate"])
    assert result.exit_code == 0, result.output
    target = json.loads(out.with_suffix(".json").read_text())["target"]
    assert target["metric"] == "latency" and target["tolerance"] == 0.05 and target["search"]
    assert f"measured {target['reached']:.2f}x afresh" in result.output
    assert ("not met" in result.output) == (not target["met"])
    assert dnnprune.load(out).conv1.out_channels < 16  # it removed channels to get there


def test_prune_to_a_target_in_sensitivity_order(runner: CliRunner, tmp_path: Path, resnet_checkpoint: Path) -> None:
    analysis = _write_analysis(tmp_path / "analysis.json", resnet_checkpoint)
    out = tmp_path / "pruned.safetensors"
    report_path = tmp_path / "r.json"
    result = runner.invoke(app, ["prune", str(resnet_checkpoint), "-o", str(out), "--target", "macs:2",
                                 "--order", "sensitivity", "--analysis", str(analysis), "--no-evaluate",
                                 "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["target"]["met"] and 2.0 <= report["target"]["reached"] < 2.2
    assert report["layer_order"][0] == "layer3.2.conv1" and report["order"] == "sensitivity"


@needs_fmnist
def test_accuracy_aware_prune_with_a_recipe(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path) -> None:
    recipe = tmp_path / "prune.yaml"
    recipe.write_text(
        "data:\n  train_limit: 1000\nprune:\n  target: macs\n  target_factor: 1.5\n  accuracy_aware: true\n"
        "  strategy: round-robin\n"
        "  step: 0.4\n  max_accuracy_drop: 0.5\n  val_samples: 200\n  samples: 200\n"
        "  step_finetune:\n    max_steps: 2\n    epochs: 1\n  finetune:\n    max_steps: 2\n    epochs: 1\n")
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(lenet_checkpoint), "-r", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "step   1" in result.output and "kept" in result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["mode"] == "accuracy-aware" and report["steps"][0]["layer"] == "features.0"
    assert report["after"]["test"]["samples"] == 200 and report["target"]["met"]
    assert dnnprune.load(out).features[0].out_channels < 6


@needs_fmnist
def test_accuracy_aware_first_steps_jump_to_the_analysis_suggestions(runner: CliRunner, tmp_path: Path,
                                                                     lenet_checkpoint: Path) -> None:
    analysis = _write_analysis(tmp_path / "analysis.json", lenet_checkpoint, suggested={"classifier.3": 0.6})
    recipe = tmp_path / "prune.yaml"
    recipe.write_text(
        "data:\n  train_limit: 500\nprune:\n  target: macs\n  target_factor: 1.3\n  accuracy_aware: true\n"
        "  strategy: round-robin\n"
        "  step: 0.2\n  max_accuracy_drop: 0.5\n  val_samples: 100\n  samples: 100\n"
        "  step_finetune:\n    max_steps: 1\n    epochs: 1\n")
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(lenet_checkpoint), "-r", str(recipe), "-o", str(out),
                                 "--order", "sensitivity", "--analysis", str(analysis)])
    assert result.exit_code == 0, result.output
    steps = json.loads(out.with_suffix(".json").read_text())["steps"]
    assert (steps[0]["layer"], steps[0]["kind"], steps[0]["ratio"]) == ("classifier.3", "jump", 0.6)
    assert all(row["kind"] == "step" for row in steps[1:])


@pytest.mark.parametrize("args, fragments", [
    (["--ratio", "1.0"], ("prune.ratio", "less than 1")),
    (["--ratio", "-0.1"], ("prune.ratio", "greater than or equal to 0")),
    (["--ratio", "0.5", "--exclude", "nothing.*"], ("nothing.*", "matches no layer")),
    (["--target", "macs:1000"], ("1000x", "without emptying")),
    (["--target", "flops:3"], ("METRIC:FACTOR",)),
    (["--ratio", "0.5", "--target", "macs:2"], ("either a ratio or a target",)),
    ([], ("say how much",)),
    (["--target", "macs:2", "--order", "sensitivity"], ("--analysis",)),
    (["--ratio", "0.5", "--criterion", "magic"], ("prune.criterion",)),
    (["--ratio", "0.5", "--criterion", "bn_scale"], ("bn_scale", "l1")),
    (["--remove", "1"], ("--remove counts whole units", "--granularity layer")),
    (["--granularity", "layer"], ("say how much to remove",)),
    (["--granularity", "layer", "--remove", "1", "--ratio", "0.5"], ("--granularity layer use --remove N",)),
    (["--granularity", "layer", "--target", "bytes:2"], ("params:F or macs:F",)),
    (["--units", "classifier.1"], ("--units names whole units", "--granularity layer")),
    (["--granularity", "layer", "--units", "classifier.9"], ("'classifier.9' is not a removable unit", "classifier.1")),
    (["--granularity", "layer", "--units", "classifier.1", "--remove", "1"], ("--units names exactly what to remove: drop --remove (prune.remove)",)),
    (["--granularity", "layer", "--units", "classifier.1,classifier.1"], ("names a unit twice: classifier.1",)),
    (["--ratio", "0.5", "--report-latency", "--latency-runtime", "tvm"], ("prune.latency_runtime", "fused")),
    (["--ratio", "0.5", "--plan-cost", "macs"], ("plan_cost macs", "--accuracy-aware", "--target")),
    (["--target", "macs:2", "--plan-cost", "latency"], ("plan_cost latency", "--accuracy-aware")),
    (["--target", "macs:2", "--accuracy-aware", "--plan-cost", "speed"], ("prune.plan_cost", "latency")),
])
def test_bad_input_fails_cleanly_and_writes_nothing(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path,
                                                   args: list[str], fragments: tuple[str, ...]) -> None:
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["prune", str(lenet_checkpoint), "-o", str(out), "--no-evaluate", *args])
    _assert_clean_failure(result, *fragments)
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_recipe_ratio_pattern_matching_nothing(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prune:\n  evaluate: false\n  ratios:\n    'conv9.*': 0.5\n")
    out = tmp_path / "out.safetensors"
    _assert_clean_failure(runner.invoke(app, ["prune", str(lenet_checkpoint), "-r", str(recipe), "-o", str(out)]),
                          "conv9.*", "matches no layer")
    assert not out.exists()


def test_analysis_from_another_model(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path,
                                     resnet_checkpoint: Path) -> None:
    analysis = _write_analysis(tmp_path / "analysis.json", resnet_checkpoint)
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["prune", str(lenet_checkpoint), "-o", str(out), "--target", "macs:2", "--no-evaluate",
                                 "--order", "sensitivity", "--analysis", str(analysis)])
    _assert_clean_failure(result, "another model", "it is for 'resnet20'", "dnnprune analyze")
    assert not out.exists()


def test_analysis_of_an_older_width_names_the_layers_that_changed(runner: CliRunner, tmp_path: Path,
                                                                  lenet_checkpoint: Path) -> None:
    analysis = _write_analysis(tmp_path / "analysis.json", lenet_checkpoint)
    narrower = tmp_path / "narrower.safetensors"
    assert runner.invoke(app, ["prune", str(lenet_checkpoint), "--ratio", "0.5", "--no-evaluate",
                               "-o", str(narrower)]).exit_code == 0
    result = runner.invoke(app, ["prune", str(narrower), "-o", str(tmp_path / "out.safetensors"), "--target", "macs:2",
                                 "--no-evaluate", "--order", "sensitivity", "--analysis", str(analysis)])
    _assert_clean_failure(result, "widths differ: features.0 6 -> 3")


def test_prune_removes_exactly_the_named_units_in_the_given_order(runner: CliRunner, tmp_path: Path,
                                                                  resnet_checkpoint: Path) -> None:
    """`--units`: the user's pick of blocks, not the analysis's; the result reloads without them."""
    out = tmp_path / "two-blocks.safetensors"
    result = runner.invoke(app, ["prune", str(resnet_checkpoint), "-o", str(out), "--granularity", "layer",
                                 "--units", "layer3.2, layer1.0", "--no-evaluate"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert [step["unit"] for step in report["steps"]] == ["layer3.2", "layer1.0"]
    model = dnnprune.load(out)
    assert type(model.layer3[2]).__name__ == "Identity" and type(model.layer1[0]).__name__ == "Identity"
    assert type(model.layer1[1]).__name__ != "Identity"


def _teacher_recipe(tmp_path: Path, teacher: Path, distill: float = 0.5) -> Path:
    recipe = tmp_path / "teacher.yaml"
    recipe.write_text(f"data:\n  train_limit: 256\nprune:\n  ratio: 0.5\n  evaluate: false\n  finetune:\n"
                      f"    max_steps: 2\n    batch_size: 64\n    distill: {distill}\n    teacher: {teacher}\n")
    return recipe


def _reordered_classes(source: Path, path: Path) -> Path:
    """The same model with its class list reversed: distilling from it would teach the wrong labels."""
    model = dnnprune.load(source)
    meta = dnnprune.meta_of(model)
    meta.classes = list(reversed(meta.classes or []))
    dnnprune.save(model, path)
    return path


def _unrunnable(path: Path) -> Path:
    """A LeNet-5 that declares 32 px, which its classifier cannot take (save itself refuses to write one)."""
    with unchecked_saves():
        return make_checkpoint(path, input_shape=(1, 32, 32))


@pytest.mark.parametrize("teacher_kind, distill, fragments", [
    ("same", 0.0, ("teacher is set", "distill > 0")),
    ("missing", 0.5, ("missing.safetensors",)),
    ("pickle", 0.5, ("pickle",)),
    ("other-classes", 0.5, ("outputs shape", "same classes")),
    ("other-input", 0.5, ("input_shape", "same inputs")),
    ("unrunnable", 0.5, ("wide.safetensors: lenet5 cannot run on its input shape 1x32x32",)),
    ("reordered-classes", 0.5, ("has classes ['Ankle boot'", "same inputs and task")),
])
def test_bad_teachers_fail_cleanly_and_write_nothing(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path,
                                                    teacher_kind: str, distill: float,
                                                    fragments: tuple[str, ...]) -> None:
    import torch

    teachers = {"same": lenet_checkpoint, "missing": tmp_path / "missing.safetensors",
                "pickle": tmp_path / "teacher.safetensors",
                "other-classes": make_checkpoint(tmp_path / "five.safetensors", num_classes=5),
                "other-input": make_checkpoint(tmp_path / "other.safetensors", "resnet20", input_shape=(1, 32, 32)),
                "unrunnable": _unrunnable(tmp_path / "wide.safetensors"),
                "reordered-classes": _reordered_classes(lenet_checkpoint, tmp_path / "reordered.safetensors")}
    torch.save({"weight": torch.zeros(2)}, tmp_path / "teacher.safetensors")  # a pickle under a safetensors name
    out = tmp_path / "out.safetensors"
    recipe = _teacher_recipe(tmp_path, teachers[teacher_kind], distill)
    result = runner.invoke(app, ["prune", str(lenet_checkpoint), "-r", str(recipe), "-o", str(out)])
    _assert_clean_failure(result, *fragments)
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.parametrize("command", ["prune", "quantize", "double-prune"])
@pytest.mark.parametrize("options, fragments", [
    (["--teacher", "{lenet}"], ("teacher is set", "--distill")),
    (["--distill", "1.5"], ("distill", "less than or equal to 1")),
    (["--distill", "0.5", "--no-evaluate"], ("distillation acts through fine-tuning", "no fine-tune is set to run")),
])
def test_bad_distill_options_fail_cleanly_and_write_nothing(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path,
                                                             command: str, options: list[str],
                                                             fragments: tuple[str, ...]) -> None:
    out = tmp_path / "out.safetensors"
    given = [option.format(lenet=lenet_checkpoint) for option in options]
    result = runner.invoke(app, [command, str(lenet_checkpoint), "-o", str(out), *given])
    _assert_clean_failure(result, *fragments)
    assert not out.exists() and not out.with_suffix(".json").exists()


@needs_fmnist
@pytest.mark.parametrize("given_by", ["recipe", "options"])
def test_fine_tune_distils_from_the_named_teacher(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path,
                                                  monkeypatch: pytest.MonkeyPatch, given_by: str) -> None:
    """A chain's later step can distil from the original rather than from its already-compressed input,
    named in the recipe or with `--teacher` and `--distill` (which then set every fine-tune of the command)."""
    import torch

    import dnnprune.training as training

    original = make_checkpoint(tmp_path / "original.safetensors")  # other random weights than lenet_checkpoint
    probe = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        named, own = dnnprune.load(original).eval()(probe), dnnprune.load(lenet_checkpoint).eval()(probe)
    assert not torch.equal(named, own)
    guides: list[torch.Tensor] = []
    real = training._with_distillation

    def spy(loss: torch.Tensor, output: torch.Tensor, inputs: torch.Tensor, teacher: torch.nn.Module,
            *args: object) -> torch.Tensor:
        with torch.no_grad():  # the teacher sits on the run's device (a GPU where there is one)
            guides.append(teacher(probe.to(next(teacher.parameters()).device)).cpu())
        return real(loss, output, inputs, teacher, *args)  # type: ignore[arg-type]

    monkeypatch.setattr("dnnprune.training._with_distillation", spy)
    out = tmp_path / "out.safetensors"
    if given_by == "recipe":
        recipe, options = _teacher_recipe(tmp_path, original), []
    else:
        recipe, options = _teacher_recipe(tmp_path, lenet_checkpoint, 0.3), ["--teacher", str(original), "--distill", "0.7"]
    result = runner.invoke(app, ["prune", str(lenet_checkpoint), "-r", str(recipe), "-o", str(out), *options])
    assert result.exit_code == 0, result.output
    assert len(guides) == 2 and all(torch.allclose(guide, named, atol=1e-5) for guide in guides)
    config = json.loads(out.with_suffix(".json").read_text())["config"]
    assert config["finetune"]["teacher"] == str(original)
    if given_by == "options":
        assert config["step_finetune"]["teacher"] == str(original)
        assert config["finetune"]["distill"] == config["step_finetune"]["distill"] == 0.7


def _measured_analysis(path: Path, checkpoint: Path) -> dict:
    """A hand-made analysis with a cell grid per layer, as `analyze` writes it."""
    _write_analysis(path, checkpoint)
    report = json.loads(path.read_text())
    graph = ChannelGraph(dnnprune.load(checkpoint), dnnprune.meta_of(dnnprune.load(checkpoint)).input_shape)
    report["primary_metric"] = "top1"
    report["layers"] = [{"name": g.name, "width": g.width, "suggested_ratio": 0.2,
                         "cells": [{"ratio": r, "removed": int(g.width * r), "top1": 0.1 - r / 10} for r in (0.3, 0.6)]}
                        for g in graph.groups]
    return report


@pytest.mark.parametrize("edit, fragment", [
    (lambda r: r["layers"][0]["cells"][0].update(top1="x"), "whose top1 is 'x'"),
    (lambda r: r["layers"][0]["cells"][0].update(top1=float("nan")), "whose top1 is nan"),
    (lambda r: r["layers"][0]["cells"][0].update(ratio="abc"), "is malformed"),
    (lambda r: r["layers"][0]["cells"][0].update(ratio=-3), "is malformed"),
    (lambda r: r["layers"].__setitem__(0, None), "is malformed"),
    (lambda r: r["baseline"].update(top1=None), "baseline top1 is not a finite number"),
    (lambda r: r["layers"][0].update(suggested_ratio=5.0), "is malformed"),
    (lambda r: r["order"].append("no.such.layer"), "one this model does not have"),
    (lambda r: r["layers"].append(dict(r["layers"][0])), "repeated"),
    (lambda r: r["layers"][0].pop("width"), "has cells but no width"),
])
def test_a_damaged_analysis_is_refused_in_one_line(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path,
                                                   edit: Callable[[dict], object], fragment: str) -> None:
    path = tmp_path / "analysis.json"
    report = _measured_analysis(path, lenet_checkpoint)
    edit(report)
    path.write_text(json.dumps(report))
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["prune", str(lenet_checkpoint), "--target", "params:2", "--order", "sensitivity",
                                 "--analysis", str(path), "--no-evaluate", "-o", str(out)])
    _assert_clean_failure(result, fragment)
    assert not out.exists()


def test_an_intact_hand_made_analysis_still_plans(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path) -> None:
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(_measured_analysis(path, lenet_checkpoint)))
    result = runner.invoke(app, ["prune", str(lenet_checkpoint), "--target", "params:2", "--order", "sensitivity",
                                 "--analysis", str(path), "--no-evaluate", "-o", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("options, fix", [
    (["--ratio", "0.3", "--latency-runtime", "fused"], "--report-latency, --latency-widths"),
    (["--granularity", "layer", "--remove", "1", "--latency-runtime", "onnxruntime"], "add --report-latency, or"),
])
def test_latency_settings_in_a_run_that_times_nothing_are_refused(runner: CliRunner, tmp_path: Path,
                                                                  resnet_checkpoint: Path, options: list[str],
                                                                  fix: str) -> None:
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(resnet_checkpoint), "-o", str(out), "--no-evaluate", *options])
    _assert_clean_failure(result, "prune.latency_runtime", "times nothing", fix)
    assert not out.exists()
    timed = runner.invoke(app, ["prune", str(resnet_checkpoint), "-o", str(out), "--no-evaluate", *options,
                                "--report-latency"])
    assert timed.exit_code == 0, timed.output
    assert json.loads(out.with_suffix(".json").read_text())["latency"]["runtime"] == options[-1]


@needs_fmnist
def test_pruning_a_sparse_checkpoint_shows_its_non_zero_parameters(runner: CliRunner, tmp_path: Path,
                                                                   resnet_checkpoint: Path) -> None:
    """`params` count every weight, zero or not: on a sparse input the table adds what is non-zero."""
    import torch

    model = dnnprune.load(resnet_checkpoint)
    dnnprune.double_prune(model, dnnprune.recipe.DoublePruneSection(slimming_ratio=0.0, sparsity=0.7, sparsity_steps=1,
                                                                    finetune_steps=0, evaluate=False))
    sparse = dnnprune.save(model, tmp_path / "sparse.safetensors")
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(sparse), "--ratio", "0.3", "--no-evaluate", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    pruned = dnnprune.load(out)
    assert report["after"]["nonzero_params"] == sum(int(torch.count_nonzero(p)) for p in pruned.parameters())
    assert report["before"]["nonzero_params"] < report["before"]["params"]
    assert "non-zero params" in result.output
    assert dnnprune.meta_of(pruned).lineage[-1].metrics["nonzero_params"] == report["after"]["nonzero_params"]


def test_a_target_passed_by_far_says_so_and_why(runner: CliRunner, tmp_path: Path, resnet_checkpoint: Path) -> None:
    """round_to 32 on widths of 16-64 leaves a 64-wide layer two widths: 1.05x asked lands far beyond, even
    after channels are given back."""
    out = tmp_path / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(resnet_checkpoint), "--target", "macs:1.05", "--round-to", "32",
                                 "--no-evaluate", "-o", str(out)])
    assert result.exit_code == 0, result.output
    target = json.loads(out.with_suffix(".json").read_text())["target"]
    assert target["met"] and target["reached"] > 1.1 * 1.05
    assert f"removed {target['reached']:.2f}x of the macs, 1.05x was asked" in result.output
    assert "multiples of round_to (32)" in result.output and "--global" in result.output
    close = runner.invoke(app, ["prune", str(resnet_checkpoint), "--target", "macs:1.2", "--no-evaluate",
                                "-o", str(tmp_path / "close.safetensors")])
    assert close.exit_code == 0 and "was asked" not in close.output, close.output
