"""`dnnprune analyze` end to end: outputs, bad input, and torchrun giving the single-process report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dnnprune.cli import app
from tests.cli.test_bad_input import _assert_clean_failure
from tests.conftest import cli_env, make_checkpoint, needs_fmnist

_QUICK = ["--samples", "200", "--ratios", "0.3,0.6"]
_VOLATILE = ("time_utc", "timing", "machine")


def _outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".json", ".csv", ".png"))


@needs_fmnist
def test_analyze_writes_report_csv_and_plot_next_to_the_checkpoint(runner: CliRunner, lenet_checkpoint: Path) -> None:
    result = runner.invoke(app, ["analyze", str(lenet_checkpoint), *_QUICK])
    assert result.exit_code == 0, result.output
    report_path = lenet_checkpoint.with_name("lenet5.analysis.json")
    report = json.loads(report_path.read_text())
    assert report["command"] == "analyze" and report["split"] == "val" and report["samples"] == 200
    assert report["model"]["checkpoint_sha256"] and report["model"]["fingerprint"]
    assert [l["name"] for l in report["layers"]] == ["features.0", "features.3", "classifier.1", "classifier.3"]
    assert sorted(report["order"]) == sorted(l["name"] for l in report["layers"])
    assert report["timing"]["cells"] == 8 and report["timing"]["processes"] == 1
    lines = lenet_checkpoint.with_name("lenet5.analysis.csv").read_text().splitlines()
    assert lines[0].startswith("layer,ratio,") and len(lines) == 1 + 8
    assert lenet_checkpoint.with_name("lenet5.analysis.png").read_bytes()[:4] == b"\x89PNG"
    assert "features.3" in result.output and "order (least sensitive first)" in result.output
    assert report["timing"]["winograd"] is True
    direct = runner.invoke(app, ["analyze", str(lenet_checkpoint), *_QUICK, "--no-winograd",
                                 "-o", str(lenet_checkpoint.with_name("direct.json"))])
    assert direct.exit_code == 0, direct.output
    direct_report = json.loads(lenet_checkpoint.with_name("direct.json").read_text())
    assert direct_report["timing"]["winograd"] is False
    assert direct_report["layers"] == report["layers"], "LeNet-5 has no Winograd-eligible conv"


@pytest.mark.parametrize("options, fragments", [
    (["--ratios", "0.5,1.5"], ("analyze.ratios", "(0, 1)")),
    (["--ratios", "0"], ("analyze.ratios", "(0, 1)")),
    (["--ratios", ""], ("ratio grid is empty",)),
    (["--ratios", "a,b"], ("--ratios",)),
    (["--criterion", "taylor"], ("taylor",)),
    (["--granularity", "layer", "--layers", "nothing*"], ("no removable unit",)),
    (["--granularity", "channels"], ("analyze.granularity",)),
    (["--layers", "nothing*"], ("nothing*",)),
    (["-o", "out.txt"], (".json",)),
])
def test_bad_input_fails_cleanly_and_writes_nothing(runner: CliRunner, tmp_path: Path, options: list[str],
                                                    fragments: tuple[str, ...]) -> None:
    checkpoint = make_checkpoint(tmp_path / "lenet5.safetensors")
    options = [str(tmp_path / o) if o == "out.txt" else o for o in options]
    result = runner.invoke(app, ["analyze", str(checkpoint), *options])
    _assert_clean_failure(result, *fragments)
    assert _outputs(tmp_path) == []


def test_model_without_prunable_layer(runner: CliRunner, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "linear.safetensors", "mlp", hidden=[])
    result = runner.invoke(app, ["analyze", str(checkpoint)])
    _assert_clean_failure(result, "no prunable layer")
    assert _outputs(tmp_path) == []


@needs_fmnist
def test_layer_granularity_measures_each_unit_removed_whole(runner: CliRunner, lenet_checkpoint: Path) -> None:
    out = lenet_checkpoint.with_name("units.json")
    result = runner.invoke(app, ["analyze", str(lenet_checkpoint), "--samples", "200", "--granularity", "layer",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["granularity"] == "layer" and report["samples"] == 200 and report["layers"]
    assert all([(c["ratio"], c["removed"]) for c in layer["cells"]] == [(1.0, 1)] for layer in report["layers"])
    assert all(layer["cells"][0]["params"] < report["model"]["params"] for layer in report["layers"])
    assert sorted(report["order"]) == sorted(layer["name"] for layer in report["layers"])
    assert out.with_suffix(".csv").exists() and "order (least sensitive first)" in result.output


@needs_fmnist
def test_more_samples_than_the_split_holds(runner: CliRunner, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "lenet5.safetensors")
    result = runner.invoke(app, ["analyze", str(checkpoint), "--samples", "1000000"])
    _assert_clean_failure(result, "1000000")
    assert _outputs(tmp_path) == []


@needs_fmnist
def test_fewer_samples_than_classes_is_refused_not_scored_as_zero(runner: CliRunner, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "lenet5.safetensors")
    result = runner.invoke(app, ["analyze", str(checkpoint), "--samples", "5"])
    _assert_clean_failure(result, "fewer than the dataset's 10 classes", "at least 10")
    assert _outputs(tmp_path) == []


def test_existing_output_needs_force(runner: CliRunner, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "lenet5.safetensors")
    plot = tmp_path / "lenet5.analysis.png"
    plot.write_bytes(b"keep me")
    result = runner.invoke(app, ["analyze", str(checkpoint)])
    _assert_clean_failure(result, "--force")
    assert plot.read_bytes() == b"keep me" and _outputs(tmp_path) == [plot]


@needs_fmnist
def test_torchrun_two_processes_write_the_single_process_report(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "lenet5.safetensors")
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    common = ["analyze", str(checkpoint), *_QUICK, "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "dnnprune", *common, "-o", str(tmp_path / "one.json")],
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "dnnprune", *common, "-o", str(tmp_path / "two.json")],
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    reports = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two")]
    assert [r["timing"]["processes"] for r in reports] == [1, 2]
    for report in reports:
        for key in _VOLATILE:
            report.pop(key)
    assert reports[0] == reports[1]
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "two.csv").read_text()
    assert two.stdout.count("order (least sensitive first)") == 1  # only rank 0 reports
