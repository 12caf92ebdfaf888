"""`--target-basis original`: a chain of prunes shares one target counted from the first model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import dnnprune
from dnnprune.cli import app
from dnnprune.errors import PruningError
from dnnprune.metrics import count_macs
from dnnprune.pruning.basis import original_size
from tests.cli.test_bad_input import _assert_clean_failure
from tests.conftest import make_checkpoint


def _entry(command: str, **metrics: object) -> SimpleNamespace:
    return SimpleNamespace(command=command, metrics=metrics)


def test_the_original_size_is_the_first_recorded_step_times_its_reduction() -> None:
    lineage = [_entry("import", source="x.pth"), _entry("train", steps=10),
               _entry("prune", macs=1000, macs_reduction=2.5), _entry("prune", macs=400, macs_reduction=2.5)]
    assert original_size(lineage, "macs") == 2500
    assert original_size(lineage, "params") is None
    assert original_size([_entry("train", steps=3)], "macs") is None


@pytest.mark.parametrize("reduction", [None, "2", -1.0, float("nan"), True, 1e308, float("inf")])
def test_a_step_without_a_usable_reduction_is_refused(reduction: object) -> None:
    metrics = {"macs": 1000} if reduction is None else {"macs": 1000, "macs_reduction": reduction}
    with pytest.raises(PruningError, match="--target-basis input"):
        original_size([_entry("double-prune", **metrics)], "macs")


def _macs(path: Path) -> int:
    model = dnnprune.load(path)
    return sum(count_macs(model, tuple(dnnprune.meta_of(model).input_shape)).values())


def test_a_chained_prune_reaches_the_target_counted_from_the_original(runner: CliRunner, tmp_path: Path) -> None:
    original = make_checkpoint(tmp_path / "resnet20.safetensors", "resnet20", input_shape=(1, 32, 32))
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    result = runner.invoke(app, ["prune", str(original), "-o", str(first), "--ratio", "0.3", "--no-evaluate"])
    assert result.exit_code == 0, result.output
    already = _macs(original) / _macs(first)
    assert 1.2 < already < 3.0
    result = runner.invoke(app, ["prune", str(first), "-o", str(second), "--target", "macs:4", "--target-basis",
                                 "original", "--no-evaluate"])
    assert result.exit_code == 0, result.output
    assert "4x macs of the original met" in result.output
    target = json.loads(second.with_suffix(".json").read_text())["target"]
    reached = _macs(original) / _macs(second)
    assert reached >= 4.0 and target["met_of_original"]
    assert target["reached_of_original"] == pytest.approx(reached, rel=1e-6)
    assert target["factor"] == pytest.approx(4.0 / already, rel=1e-6)  # what this step alone was asked for
    assert target["input_reduction_of_original"] == pytest.approx(already, rel=1e-6)


def test_a_target_the_input_already_meets_is_refused(runner: CliRunner, tmp_path: Path) -> None:
    original = make_checkpoint(tmp_path / "resnet20.safetensors", "resnet20", input_shape=(1, 32, 32))
    first = tmp_path / "first.safetensors"
    assert runner.invoke(app, ["prune", str(original), "-o", str(first), "--ratio", "0.5", "--no-evaluate"]).exit_code == 0
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["prune", str(first), "-o", str(out), "--target", "macs:1.5", "--target-basis",
                                 "original", "--no-evaluate"])
    _assert_clean_failure(result, "leaves nothing to prune", "raise the factor")
    assert not out.exists()
    result = runner.invoke(app, ["prune", str(first), "-o", str(out), "--target", "bytes:4", "--target-basis",
                                 "original", "--no-evaluate"])
    _assert_clean_failure(result, "not bytes", "--target-basis input")
    result = runner.invoke(app, ["prune", str(first), "-o", str(out), "--target", "macs:4", "--target-basis",
                                 "orginal", "--no-evaluate"])
    _assert_clean_failure(result, "target_basis")
    assert not out.exists()


def test_with_no_earlier_step_the_basis_is_the_input(runner: CliRunner, tmp_path: Path) -> None:
    original = make_checkpoint(tmp_path / "resnet20.safetensors", "resnet20", input_shape=(1, 32, 32))
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["prune", str(original), "-o", str(out), "--target", "macs:2", "--target-basis",
                                 "original", "--no-evaluate"])
    assert result.exit_code == 0, result.output
    target = json.loads(out.with_suffix(".json").read_text())["target"]
    assert target["input_reduction_of_original"] == 1.0 and target["factor"] == 2.0
    assert _macs(original) / _macs(out) >= 2.0


def test_a_double_prune_step_counts_towards_the_original(runner: CliRunner, tmp_path: Path) -> None:
    """double-prune records its reductions in the lineage, so a prune after it can count from the original."""
    original = make_checkpoint(tmp_path / "resnet20.safetensors", "resnet20", input_shape=(1, 32, 32))
    slim, out = tmp_path / "slim.safetensors", tmp_path / "out.safetensors"
    result = runner.invoke(app, ["double-prune", str(original), "--slimming-ratio", "0.3", "--sparsity", "0",
                                 "--sparsity-steps", "0", "--finetune-steps", "0", "--no-evaluate", "-o", str(slim)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["prune", str(slim), "--target", "params:4", "--target-basis", "original",
                                 "--no-evaluate", "-o", str(out)])
    assert result.exit_code == 0, result.output
    params = [sum(p.numel() for p in dnnprune.load(path).parameters()) for path in (original, slim, out)]
    assert params[0] / params[1] > 1.2 and params[0] / params[2] >= 4.0
