"""`dnnprune quantize` end to end: packed checkpoint, honest report, clean failures on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dnnprune
from dnnprune.cli import app
from tests.cli.test_bad_input import _assert_clean_failure
from tests.conftest import make_checkpoint, needs_fmnist


@pytest.fixture
def bn_checkpoint(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "resnet20.safetensors", "resnet20", input_shape=(1, 32, 32))


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--bits", "1"], ("quantize.bits", "greater than or equal to 2")),
        (["--bits", "9"], ("quantize.bits", "less than or equal to 8")),
        (["--layers", "decoder.*"], ("'decoder.*' matches no layer",)),
        (["--layers", "type:BatchNorm2d"], ("'type:BatchNorm2d' matches only layers that cannot be handled here",
                                            "bn1 (BatchNorm2d)")),
        (["--layers", "layer1.0.bn1"], ("'layer1.0.bn1' is a BatchNorm2d",)),
        (["--layer-bits", "type:Conv2d=12"], ("layer_bits",)),
        (["--layer-bits", "type:Conv2d"], ("PATTERN=BITS",)),
        (["--method", "huffman"], ("quantize.method",)),
    ],
)
def test_bad_input_fails_cleanly_and_writes_nothing(runner: CliRunner, tmp_path: Path, bn_checkpoint: Path,
                                                    options: list[str], fragments: tuple[str, ...]) -> None:
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["quantize", str(bn_checkpoint), "-o", str(out), "--no-evaluate", *options])
    _assert_clean_failure(result, *fragments)
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_a_glob_passes_over_layers_it_cannot_quantize(runner: CliRunner, tmp_path: Path, bn_checkpoint: Path) -> None:
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["quantize", str(bn_checkpoint), "-o", str(out), "--no-evaluate", "--layers", "layer1.0.*"])
    assert result.exit_code == 0, result.output
    assert set(dnnprune.meta_of(dnnprune.load(out)).encodings) == {"layer1.0.conv1.weight", "layer1.0.conv2.weight"}


def test_quantize_writes_a_smaller_checkpoint_and_an_honest_report(runner: CliRunner, tmp_path: Path,
                                                                     lenet_checkpoint: Path) -> None:
    out = tmp_path / "q.safetensors"
    result = runner.invoke(app, ["quantize", str(lenet_checkpoint), "-o", str(out), "--no-evaluate", "--bits", "5",
                                 "--layer-bits", "type:Conv2d=8"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    totals = report["totals"]
    assert totals["disk_bytes_after"] == out.stat().st_size
    assert abs(totals["predicted_file_bytes"] - totals["disk_bytes_after"]) / totals["disk_bytes_after"] < 0.02
    assert totals["disk_bytes_before"] == lenet_checkpoint.stat().st_size
    assert totals["compression"] > 4 and totals["effective_bits_per_weight"] < 8
    assert {row["name"]: row["bits"] for row in report["layers"]} == {
        "features.3": 8, "classifier.1": 5, "classifier.3": 5, "classifier.5": 5}
    # conv1 has 150 weights: 8-bit codes and their codebook would outweigh 600 bytes of fp32, so it stays
    assert list(report["kept_as_is"]) == ["features.0"] and "kept as it was: features.0" in result.output
    assert all(row["sqnr_db"] > 10 for row in report["layers"])
    assert all(row["bytes_after"] < row["bytes_before"] / 5 for row in report["layers"] if row["type"] == "Linear")
    meta = dnnprune.meta_of(dnnprune.load(out))
    assert meta.lineage[-1].command == "quantize"
    assert meta.lineage[-1].metrics["layers"] == {"features.3": 8, "classifier.1": 5, "classifier.3": 5,
                                                  "classifier.5": 5}
    assert "features.0.weight" not in meta.encodings
    encoding = meta.encodings["features.3.weight"]
    assert (encoding.values.codec, encoding.values.bits, encoding.sparse) == ("kmeans", 8, None)
    assert meta.encodings["classifier.1.weight"].values.bits == 5

    again = runner.invoke(app, ["quantize", str(out), "-o", str(tmp_path / "twice.safetensors"), "--no-evaluate"])
    _assert_clean_failure(again, "already quantized")
    convs = runner.invoke(app, ["quantize", str(out), "-o", str(tmp_path / "more.safetensors"), "--no-evaluate",
                                "--layers", "type:Conv2d", "--method", "linear", "--bits", "4"])
    _assert_clean_failure(convs, "already quantized")


@needs_fmnist
def test_quantize_measures_accuracy_and_int8_execution(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path) -> None:
    out = tmp_path / "q.safetensors"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("score:\n  latency_config:\n    batch_sizes: [8]\n    repeats: 3\n    warmup: 1\n")
    result = runner.invoke(app, ["quantize", str(lenet_checkpoint), "-r", str(recipe), "-o", str(out), "--samples", "200",
                                 "--method", "linear", "--bits", "8", "--int8-execution"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["primary_metric"] == "top1" and report["metrics"]["split"] == "test"
    assert report["metrics"]["before"]["samples"] == 200 == report["metrics"]["after"]["samples"]
    int8 = report["int8_execution"]
    assert int8["available"], int8
    assert int8["linear_layers"] == 3 and int8["latency"][0]["int8_median_ms"] > 0
    scored = runner.invoke(app, ["score", str(out), "--samples", "200", "--no-latency", "--json"])
    assert scored.exit_code == 0, scored.output


@needs_fmnist
def test_the_finetune_lr_option_reaches_the_fine_tune_and_its_verdict_is_reported(runner: CliRunner, tmp_path: Path,
                                                                                   lenet_checkpoint: Path) -> None:
    out = tmp_path / "q.safetensors"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantize:\n  val_samples: 300\n  finetune:\n    batch_size: 32\n")
    result = runner.invoke(app, ["quantize", str(lenet_checkpoint), "-r", str(recipe), "-o", str(out), "--samples", "200",
                                 "--bits", "4", "--finetune-epochs", "1", "--finetune-steps", "3", "--finetune-lr", "0.002"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["section"]["finetune"]["lr"] == 0.002 and report["finetune"]["steps"] == 3
    tune = report["finetune"]
    assert isinstance(tune["kept"], bool) and 0.0 <= tune["val_before"] <= 1.0
    verdict = "kept" if tune["kept"] else "undone"
    assert f"fine-tune {verdict}: val top1 {tune['val_before']:.4f} -> {tune['val_after']:.4f}" in result.output
