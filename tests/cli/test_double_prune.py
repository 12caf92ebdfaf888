"""`dnnprune double-prune` end to end: a slimmed, sparse checkpoint that is smaller on disk, quantizes and
fine-tunes without losing a zero, an honest report, and clean failures on bad input. (The bit-identical
reload in a new process is tested on the library's output, in tests/test_double_prune.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from typer.testing import CliRunner

import dnnprune
from dnnprune.checkpoint import read_meta
from dnnprune.cli import app
from dnnprune.codecs import SEPARATOR, decode_tensor
from tests.cli.test_bad_input import _assert_clean_failure
from tests.conftest import FMNIST_DIR, make_checkpoint, needs_fmnist

SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cli-double") / "resnet20.safetensors", "resnet20",
                           input_shape=SHAPE)


@pytest.fixture(scope="module")
def double_pruned(resnet_file: Path) -> dict[str, Any]:
    """One CLI run, slimming half the BN channels and zeroing 80% of the remaining weights."""
    out = resnet_file.parent / "double.safetensors"
    result = CliRunner().invoke(app, ["double-prune", str(resnet_file), "-o", str(out), "--slimming-ratio", "0.5",
                                      "--sparsity", "0.8", "--no-evaluate"])
    assert result.exit_code == 0, result.output
    return {"out": out, "output": result.output, "report": json.loads(out.with_suffix(".json").read_text())}


def _zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() == 0 for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _decoded_from_file(path: Path) -> dict[str, torch.Tensor]:
    """Every encoded weight, decoded straight from the stored parts (no model involved)."""
    encodings = read_meta(path).encodings
    stored = load_file(str(path))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in stored.items():
        name, separator, part = key.partition(SEPARATOR)
        if separator:
            parts.setdefault(name, {})[part] = tensor
    assert set(parts) == set(encodings) and not set(parts) & set(stored)  # no dense copy beside the parts
    return {name: decode_tensor(parts[name], encodings[name]) for name in encodings}


def test_double_prune_writes_a_slimmed_sparse_checkpoint_and_its_report(double_pruned: dict[str, Any],
                                                                        resnet_file: Path) -> None:
    out, report = double_pruned["out"], double_pruned["report"]
    assert report["command"] == "double-prune" and report["inputs"]["checkpoint"] == str(resnet_file)
    assert report["config"]["slimming_ratio"] == 0.5 and report["config"]["sparsity"] == 0.8
    totals = report["totals"]
    assert totals["file_bytes"] == out.stat().st_size
    assert totals["compression_vs_fp32"] == pytest.approx(totals["fp32_bytes_before"] / out.stat().st_size)
    assert totals["compression_vs_fp32"] > 5.0  # 0.5 slimming x 0.8 sparsity, stored sparse
    assert out.stat().st_size < resnet_file.stat().st_size / 5
    assert abs(totals["predicted_file_bytes"] - totals["file_bytes"]) < 4096
    assert totals["effective_bits_per_weight"] < 32 / 3
    # Bits per weight are the file's, header included (they were the tensors' predicted bytes).
    params = report["stages"][-1]["params"]
    assert totals["effective_bits_per_weight"] == pytest.approx(8 * out.stat().st_size / params)
    assert [s["stage"] for s in report["stages"]] == ["before", "slimmed", "after_slimming",
                                                      "after_parameter_pruning", "final"]
    model = dnnprune.load(out)
    meta = dnnprune.meta_of(model)
    assert meta.lineage[-1].command == "double-prune"
    assert meta.lineage[-1].metrics["nonzero_params"] == report["stages"][-1]["nonzero_params"]
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    assert nonzero == report["stages"][-1]["nonzero_params"]
    assert sum(p.numel() for p in model.parameters()) == report["stages"][-1]["params"]
    decoded = _decoded_from_file(out)
    assert set(decoded) == {f"{n}.weight" for n in _zero_masks(model)}
    for name, weight in decoded.items():
        assert torch.equal(weight, model.get_parameter(name).detach()), name
    rows = {r["name"]: r for r in report["layers"]}
    assert {f"{n}.weight" for n in rows} == set(decoded)
    assert all(r["nonzero"] == int(torch.count_nonzero(decoded[f"{n}.weight"])) for n, r in rows.items())
    printed = double_pruned["output"]
    assert "double-prune: resnet20" in printed and "non-zero parameters" in printed
    assert f"{totals['file_bytes']:,} bytes" in printed


def test_quantize_after_double_prune_shrinks_the_file_and_keeps_every_zero(runner: CliRunner, tmp_path: Path,
                                                                           double_pruned: dict[str, Any]) -> None:
    sparse = double_pruned["out"]
    out = tmp_path / "quantized.safetensors"
    result = runner.invoke(app, ["quantize", str(sparse), "-o", str(out), "--method", "kmeans", "--bits", "5",
                                 "--layers", "type:Conv2d", "--layers", "type:Linear", "--no-evaluate"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size < 0.6 * sparse.stat().st_size
    before = _decoded_from_file(sparse)
    after = _decoded_from_file(out)
    assert set(after) == set(before)
    kept = {f"{layer}.weight" for layer in json.loads(out.with_suffix(".json").read_text())["kept_as_is"]}
    for name, spec in read_meta(out).encodings.items():
        assert spec.sparse is not None, name
        # a layer too small for a 32-entry codebook to pay off stays sparse fp32, and the report says so
        assert (spec.values is None) if name in kept else (spec.values is not None and spec.values.codec == "kmeans"), name
        assert bool((after[name][before[name] == 0] == 0).all()), name  # every zero kept
        assert int(torch.count_nonzero(after[name])) <= int(torch.count_nonzero(before[name])), name
        assert len(torch.unique(after[name])) <= 2 ** 5, name
    model = dnnprune.load(out)
    assert all(torch.equal(model.get_parameter(n).detach(), w) for n, w in after.items())


@needs_fmnist
def test_train_on_a_double_pruned_checkpoint_keeps_every_zero(runner: CliRunner, tmp_path: Path,
                                                              double_pruned: dict[str, Any]) -> None:
    sparse = double_pruned["out"]
    out = tmp_path / "trained.safetensors"
    result = runner.invoke(app, ["train", str(sparse), "-o", str(out), "--data-root", str(FMNIST_DIR),
                                 "--max-steps", "4", "--train-limit", "256", "--batch-size", "32", "--lr", "0.05"])
    assert result.exit_code == 0, result.output
    before, after = dnnprune.load(sparse), dnnprune.load(out)
    zeros_before, zeros_after = _zero_masks(before), _zero_masks(after)
    changed = 0
    for name, zero in zeros_before.items():
        assert torch.equal(zeros_after[name], zero), name  # exactly the same zeros: none revived, none added
        weight_before, weight_after = before.get_submodule(name).weight, after.get_submodule(name).weight
        changed += int(not torch.equal(weight_before, weight_after))
    assert changed == len(zeros_before)  # every layer trained
    assert read_meta(out).encodings == read_meta(sparse).encodings
    assert abs(out.stat().st_size - sparse.stat().st_size) < 0.05 * sparse.stat().st_size


def test_slimming_ratio_zero_prunes_parameters_alone_without_batchnorm(runner: CliRunner, tmp_path: Path,
                                                                        lenet_checkpoint: Path) -> None:
    out = tmp_path / "lenet-sparse.safetensors"
    result = runner.invoke(app, ["double-prune", str(lenet_checkpoint), "-o", str(out), "--slimming-ratio", "0",
                                 "--sparsity", "0.9", "--no-evaluate", "--sparse-execution"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["slimming"] is None
    assert [s["stage"] for s in report["stages"]] == ["before", "after_parameter_pruning", "final"]
    before, final = report["stages"][0], report["stages"][-1]
    assert final["params"] == before["params"] and final["macs"] == before["macs"]
    layers = report["layers"]
    total = sum(r["params"] for r in layers)
    zeros = sum(r["params"] - r["nonzero"] for r in layers)
    assert abs(zeros - round(0.9 * total)) <= len(layers)
    assert report["parameter_pruning"]["reached_sparsity"] == pytest.approx(zeros / total)
    assert out.stat().st_size < lenet_checkpoint.stat().st_size / 4
    linears = [r["name"] for r in layers if r["type"] == "Linear"]
    timed = report["sparse_execution"]
    assert sorted({(r["layer"], r["batch_size"]) for r in timed["layers"]}) == sorted(
        (n, b) for n in linears for b in (1, 64))
    assert all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in timed["layers"])
    assert [m["batch_size"] for m in timed["model"]] == [1, 64]
    assert all(set(m["sparse_layers"]) <= set(linears) for m in timed["model"])


def test_sparsity_zero_slims_alone(runner: CliRunner, tmp_path: Path, resnet_file: Path) -> None:
    out = tmp_path / "slim.safetensors"
    result = runner.invoke(app, ["double-prune", str(resnet_file), "-o", str(out), "--sparsity", "0",
                                 "--slimming-ratio", "0.5", "--no-evaluate"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["parameter_pruning"] is None and report["slimming"]["removed"] == round(0.5 * 448)
    assert len(report["slimming"]["rounds"]) == 1
    model = dnnprune.load(out)
    assert not dnnprune.meta_of(model).encodings
    params = sum(p.numel() for p in model.parameters())
    assert params == report["stages"][-1]["params"] < 0.75 * report["stages"][0]["params"]
    assert all(r["encoding"] is None and r["density"] > 0.99 for r in report["layers"])
    assert out.stat().st_size < 0.75 * resnet_file.stat().st_size


def test_recipe_values_and_option_overrides(runner: CliRunner, tmp_path: Path, resnet_file: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("double_prune:\n  slimming_ratio: 0.3\n  sparsity: 0.5\n  threshold: global\n"
                      "  first_last_factor: 0.0\n  evaluate: false\n")
    out = tmp_path / "recipe.safetensors"
    result = runner.invoke(app, ["double-prune", str(resnet_file), "-r", str(recipe), "-o", str(out),
                                 "--sparsity", "0.7", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert not out.with_suffix(".json").exists()
    assert report["config"]["sparsity"] == 0.7 and report["config"]["slimming_ratio"] == 0.3
    assert report["parameter_pruning"]["threshold"] == "global"
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["conv1"]["density"] == 1.0 and rows["fc"]["density"] == 1.0  # factor 0: left dense


def test_slimming_rounds_option_slims_iteratively_and_reloads(runner: CliRunner, tmp_path: Path,
                                                              resnet_file: Path) -> None:
    out = tmp_path / "rounds.safetensors"
    result = runner.invoke(app, ["double-prune", str(resnet_file), "-o", str(out), "--slimming-ratio", "0.5",
                                 "--slimming-rounds", "2", "--sparsity", "0.5", "--no-evaluate"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["config"]["slimming_rounds"] == 2 and len(report["slimming"]["rounds"]) == 2
    assert abs(report["slimming"]["removed"] - 224) <= 2
    model = dnnprune.load(out)
    assert sum(p.numel() for p in model.parameters()) == report["stages"][-1]["params"]


@pytest.fixture
def quantized_checkpoint(tmp_path: Path, lenet_checkpoint: Path) -> Path:
    out = tmp_path / "lenet-q.safetensors"
    result = CliRunner().invoke(app, ["quantize", str(lenet_checkpoint), "-o", str(out), "--no-evaluate"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    "source, options, fragments",
    [
        ("resnet", ["--slimming-ratio", "1.2"], ("double_prune.slimming_ratio",)),
        ("resnet", ["--sparsity", "-0.1"], ("double_prune.sparsity",)),
        ("resnet", ["--sparsity", "1"], ("double_prune.sparsity",)),
        ("resnet", ["--threshold", "median"], ("double_prune.threshold",)),
        ("resnet", ["--slimming-rounds", "0"], ("double_prune.slimming_rounds",)),
        ("lenet", ["--slimming-ratio", "0.5"], ("no BatchNorm", "--slimming-ratio 0")),
        ("resnet", ["--sparsity", "0.999"], ("would empty layers", "lower --sparsity")),
        ("resnet", ["--slimming-ratio", "0.8", "--sparsity", "0.99"], ("would empty layers", "--slimming-ratio")),
        ("resnet", ["-r", "MIN_DENSITY"], ("would empty layers", "min_density 0.3")),
        ("resnet", ["--slimming-ratio", "0", "--sparsity", "0"], ("nothing to do",)),
        ("quantized", ["--slimming-ratio", "0"], ("quantized", "then quantize")),
    ],
)
def test_bad_input_fails_cleanly_and_writes_nothing(runner: CliRunner, tmp_path: Path, resnet_file: Path,
                                                    lenet_checkpoint: Path, request: pytest.FixtureRequest,
                                                    source: str, options: list[str], fragments: tuple[str, ...]) -> None:
    checkpoint = {"resnet": resnet_file, "lenet": lenet_checkpoint}.get(source)
    if source == "quantized":
        checkpoint = request.getfixturevalue("quantized_checkpoint")
    if "MIN_DENSITY" in options:
        recipe = tmp_path / "dense.yaml"
        recipe.write_text("double_prune:\n  sparsity: 0.8\n  min_density: 0.3\n")
        options = ["-r", str(recipe)]
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["double-prune", str(checkpoint), "-o", str(out), "--no-evaluate", *options])
    _assert_clean_failure(result, *fragments)
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == []
