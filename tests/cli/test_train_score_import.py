"""train → score → import end to end through the real CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import torch
import torchvision
from safetensors.torch import save_file
from typer.testing import CliRunner

import dnnprune
from dnnprune.cli import app
from tests.conftest import needs_fmnist
from tests.fakedata import write_mnist


def _train_tiny_mnist(runner: CliRunner, tmp_path: Path, out: Path, *extra: str) -> dict:
    root = tmp_path / "mnist-data"
    write_mnist(root / "MNIST" / "raw", n_train=300, n_test=100)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  val_fraction: 0.2\n  batch_size: 64\ntrain:\n  batch_size: 32\n  lr: 0.01\n  schedule: constant\n")
    result = runner.invoke(app, ["train", "lenet5", "-r", str(recipe), "-o", str(out), "--dataset", "mnist",
                                 "--data-root", str(root), "--epochs", "2", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(out.with_suffix(".json").read_text())


def test_train_from_scratch_on_mnist_files_writes_checkpoint_and_curves(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "lenet.safetensors"
    report = _train_tiny_mnist(runner, tmp_path, out)
    epochs = report["history"]["epochs"]
    assert [row["epoch"] for row in epochs] == [1, 2]
    assert all({"train_loss", "train_top1", "val_top1", "lr"} <= set(row) for row in epochs)
    assert report["test"]["samples"] == 100
    meta = dnnprune.meta_of(dnnprune.load(out))
    assert meta.dataset == "mnist" and meta.input_shape == (1, 28, 28) and meta.arch_args["input_size"] == 28
    assert meta.lineage[-1].command == "train" and len(meta.lineage[-1].recipe_sha256) == 64
    assert meta.lineage[-1].metrics["test_top1"] == report["test"]["top1"] and report["primary_metric"] == "top1"


def test_recipe_normalisation_with_the_wrong_channel_count_names_the_recipe_key(runner: CliRunner,
                                                                                tmp_path: Path) -> None:
    """It was reported as invalid checkpoint metadata; one value now serves every channel, as at import."""
    root = tmp_path / "mnist-data"
    write_mnist(root / "MNIST" / "raw", n_train=120, n_test=40)
    recipe = tmp_path / "r.yaml"
    common = ["--dataset", "mnist", "--data-root", str(root), "--max-steps", "1"]
    recipe.write_text("data:\n  mean: [0.1, 0.2, 0.3]\n")
    result = runner.invoke(app, ["train", "lenet5", "-r", str(recipe), "-o", str(tmp_path / "a.safetensors"), *common])
    assert result.exit_code == 2 and "data.mean takes 1 value (for every channel) or 1, one per input channel; got 3" in result.output, result.output
    recipe.write_text("data:\n  mean: [0.2]\n  std: [0.3]\n")
    out = tmp_path / "b.safetensors"
    result = runner.invoke(app, ["train", "lenet5", "-r", str(recipe), "-o", str(out), *common])
    assert result.exit_code == 0, result.output
    meta = dnnprune.meta_of(dnnprune.load(out))
    assert meta.mean == (0.2,) and meta.std == (0.3,)


def test_training_is_deterministic_for_a_seed(runner: CliRunner, tmp_path: Path) -> None:
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _train_tiny_mnist(runner, tmp_path, first, "--seed", "3")
    _train_tiny_mnist(runner, tmp_path, second, "--seed", "3")
    a, b = dnnprune.load(first).state_dict(), dnnprune.load(second).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_records_parent_in_lineage(runner: CliRunner, tmp_path: Path) -> None:
    parent = tmp_path / "parent.safetensors"
    _train_tiny_mnist(runner, tmp_path, parent)
    child = tmp_path / "child.safetensors"
    root = tmp_path / "mnist-data"
    result = runner.invoke(app, ["train", str(parent), "-o", str(child), "--data-root", str(root), "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    lineage = dnnprune.meta_of(dnnprune.load(child)).lineage
    assert [e.command for e in lineage] == ["train", "train"]
    assert lineage[1].parent_sha256 == dnnprune.checkpoint.file_sha256(parent)


def test_score_report_has_every_metric(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "lenet.safetensors"
    _train_tiny_mnist(runner, tmp_path, out)
    report_path = tmp_path / "score.json"
    result = runner.invoke(app, ["score", str(out), "--data-root", str(tmp_path / "mnist-data"), "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    assert "NetScore" in result.output
    report = json.loads(report_path.read_text())
    params, macs, top1 = report["params"], report["macs"], report["metrics"]["top1"]
    assert report["primary_metric"] == "top1" and report["task"]["kind"] == "classification"
    loaded = dnnprune.load(out)
    assert params == sum(p.numel() for p in loaded.parameters())
    nonzero = report["nonzero_params"]
    assert nonzero == sum(int(p.count_nonzero()) for p in loaded.parameters()) and nonzero <= params
    assert macs == 6 * 28 * 28 * 25 + 16 * 10 * 10 * 6 * 25 + 400 * 120 + 120 * 84 + 84 * 10
    assert report["disk_bytes"] == out.stat().st_size
    assert math.isclose(report["bits_per_weight"], out.stat().st_size * 8 / params)
    expected = 20 * math.log10((top1 * 100) ** 2 / ((params / 1e6) ** 0.5 * (macs / 1e6) ** 0.5))
    assert math.isclose(report["netscore"]["value"], expected, rel_tol=1e-9)
    expected_nonzero = 20 * math.log10((top1 * 100) ** 2 / ((nonzero / 1e6) ** 0.5 * (macs / 1e6) ** 0.5))
    assert math.isclose(report["netscore"]["value_nonzero"], expected_nonzero, rel_tol=1e-9)
    assert report["netscore"]["units"]["p"].startswith("parameters in millions")
    assert [row["batch_size"] for row in report["latency"]] == [1, 64]
    assert all(row["median_ms"] > 0 for row in report["latency"])
    assert report["metrics"]["top5"] is not None and report["metrics"]["samples"] == 100


def test_score_json_flag_prints_the_report(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "lenet.safetensors"
    _train_tiny_mnist(runner, tmp_path, out)
    result = runner.invoke(app, ["score", str(out), "--data-root", str(tmp_path / "mnist-data"), "--json", "--no-latency"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["command"] == "score" and printed["latency"] == []


def test_score_names_the_dataset_it_used(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path) -> None:
    """The checkpoint says fashion-mnist; scored with --dataset mnist, the report must say mnist."""
    root = tmp_path / "mnist-data"
    write_mnist(root / "MNIST" / "raw", n_train=50, n_test=20)
    result = runner.invoke(app, ["score", str(lenet_checkpoint), "--dataset", "mnist", "--data-root", str(root),
                                 "--json", "--no-latency"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["dataset"] == "mnist"


def _torchvision_resnet18_state(path: Path) -> torch.nn.Module:
    """A resnet18 built the way a user elsewhere would: plain torchvision, 1-channel stem, saved with torch.save."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return model.eval()


def test_import_torchvision_resnet18_reproduces_outputs(runner: CliRunner, tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.pth"
    original = _torchvision_resnet18_state(weights)
    out = tmp_path / "resnet18.safetensors"
    result = runner.invoke(app, ["import", str(weights), "--arch", "torchvision.resnet18", "--dataset", "fashion-mnist",
                                 "--input-shape", "1,32,32", "-o", str(out)])
    assert result.exit_code == 0, result.output
    imported = dnnprune.load(out)
    sample = torch.randn(4, 1, 32, 32)
    with torch.inference_mode():
        assert torch.equal(imported(sample), original(sample))
    meta = dnnprune.meta_of(imported)
    assert meta.arch_args == {"num_classes": 10, "in_channels": 1} and meta.input_shape == (1, 32, 32)
    assert meta.lineage[0].command == "import"


def test_import_plain_safetensors_with_module_prefix(runner: CliRunner, tmp_path: Path) -> None:
    model = dnnprune.models.create_model("resnet20", num_classes=10, in_channels=1)
    weights = tmp_path / "dp.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / "r20.safetensors"
    result = runner.invoke(app, ["import", str(weights), "--arch", "resnet20", "--input-shape", "1,32,32",
                                 "--mean", "0.5", "--std", "0.25", "-o", str(out)])
    assert result.exit_code == 0, result.output
    meta = dnnprune.meta_of(dnnprune.load(out))
    assert meta.mean == (0.5,) and meta.std == (0.25,) and meta.arch_args["num_classes"] == 10


def test_score_latency_on_the_fused_runtime(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "lenet.safetensors"
    _train_tiny_mnist(runner, tmp_path, out)
    recipe = tmp_path / "latency.yaml"
    recipe.write_text("score:\n  latency_config:\n    batch_sizes: [4]\n    repeats: 3\n")
    result = runner.invoke(app, ["score", str(out), "-r", str(recipe), "--data-root", str(tmp_path / "mnist-data"),
                                 "--latency-runtime", "fused", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["latency"]
    assert [(r["batch_size"], r["runtime"]) for r in rows] == [(4, "fused")] and rows[0]["median_ms"] > 0
    bad = runner.invoke(app, ["score", str(out), "--data-root", str(tmp_path / "mnist-data"), "--latency-runtime", "tvm"])
    assert bad.exit_code == 2 and "runtime" in bad.output and "Traceback" not in bad.output


@needs_fmnist
def test_score_on_real_fashion_mnist_subset(runner: CliRunner, lenet_checkpoint: Path) -> None:
    result = runner.invoke(app, ["score", str(lenet_checkpoint), "--samples", "500", "--no-latency", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["metrics"]["samples"] == 500 and report["dataset"] == "fashion-mnist"


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "dnnprune", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("train", "import", "score"):
        assert name in done.stdout


def test_help_keeps_every_bracketed_phrase(runner: CliRunner) -> None:
    """Rich reads "[...]" as markup and drops it; help texts must escape it so users see ranges and defaults."""
    import typer.main

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        shown = " ".join(runner.invoke(app, [name, "--help"]).output.replace("│", " ").split())
        for param in command.params:
            help_text = getattr(param, "help", None) or ""
            for phrase in re.findall(r"\[[^\]]*[\])]", help_text.replace("\\[", "[")):
                assert " ".join(phrase.split()) in shown, f"{name} --{param.name}: {phrase!r} is lost in --help"
