"""Outputs never land on an input (checkpoint, recipe, analysis, teacher), --force or not; unwritable
folders, foreign weight files and diverging training each cost one line and exit 2, with nothing written."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from dnnprune.cli import app
from dnnprune.models import create_model
from tests.cli.test_bad_input import _assert_clean_failure
from tests.fakedata import write_mnist


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "lenet.pth"
    torch.save(create_model("lenet5").state_dict(), path)
    return path


def _import(runner: CliRunner, weights: Path, out: Path, *extra: str) -> Any:
    return runner.invoke(app, ["import", str(weights), "--arch", "lenet5", "--input-shape", "1,28,28",
                               "-o", str(out), *extra])


def test_import_report_never_overwrites_the_weights(runner: CliRunner, tmp_path: Path, weights: Path) -> None:
    before = _digest(weights)
    out = tmp_path / "out.safetensors"
    for extra in ([], ["--force"]):
        result = _import(runner, weights, out, "--report", str(weights), *extra)
        _assert_clean_failure(result)
        assert _digest(weights) == before and not out.exists()


def test_import_report_is_guarded_like_every_report(runner: CliRunner, tmp_path: Path, weights: Path) -> None:
    keep = tmp_path / "keep.json"
    keep.write_text("precious")
    out = tmp_path / "out.safetensors"
    _assert_clean_failure(_import(runner, weights, out, "--report", str(keep)), "already exists", "--report")
    _assert_clean_failure(_import(runner, weights, out, "--report", str(tmp_path / "nodir" / "r.json")), "does not exist")
    assert keep.read_text() == "precious" and not out.exists()
    result = _import(runner, weights, out, "--report", str(keep), "--force")
    assert result.exit_code == 0, result.output
    assert "arch" in keep.read_text()


@pytest.mark.parametrize("victim", ["recipe", "analysis", "teacher"])
def test_force_never_overwrites_a_file_the_recipe_names(runner: CliRunner, tmp_path: Path,
                                                        lenet_checkpoint: Path, victim: str) -> None:
    analysis = tmp_path / "a.json"
    analysis.write_text("{}")
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(lenet_checkpoint.read_bytes())
    recipe = tmp_path / "r.json"  # a recipe may be any YAML, JSON included, so it may collide with a report
    recipe.write_text('{"prune": {"ratio": 0.3, "evaluate": false}}')
    out, extra = {
        "recipe": (tmp_path / "x.safetensors", ["--report", str(recipe)]),
        "analysis": (tmp_path / "a.safetensors", ["--analysis", str(analysis)]),  # default report a.json
        "teacher": (teacher, ["--teacher", str(teacher), "--distill", "0.5"]),
    }[victim]
    files = {path: _digest(path) for path in (analysis, teacher, recipe)}
    result = runner.invoke(app, ["prune", str(lenet_checkpoint), "-r", str(recipe), "-o", str(out), "--force", *extra])
    _assert_clean_failure(result, "is an input file")
    assert {path: _digest(path) for path in files} == files


def test_score_report_needs_force_and_never_overwrites_an_input(runner: CliRunner, tmp_path: Path,
                                                                 lenet_checkpoint: Path) -> None:
    recipe = tmp_path / "r.json"
    recipe.write_text('{"score": {"latency": false}}')
    keep = tmp_path / "keep.json"
    keep.write_text("precious")
    score = ["score", str(lenet_checkpoint), "-r", str(recipe)]
    _assert_clean_failure(runner.invoke(app, [*score, "--report", str(keep)]), "already exists", "--force")
    _assert_clean_failure(runner.invoke(app, [*score, "--report", str(recipe), "--force"]), "is an input file")
    folder = tmp_path / "d.json"
    folder.mkdir()
    _assert_clean_failure(runner.invoke(app, [*score, "--report", str(folder)]), "is a directory", "--report")
    assert keep.read_text() == "precious" and "score" in recipe.read_text()


def test_an_unwritable_output_folder_is_refused_before_any_work(runner: CliRunner, tmp_path: Path,
                                                                lenet_checkpoint: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Root ignores permission bits, so the read-only folder is simulated where the probe creates its file."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        if Path(kwargs.get("dir", "")) == locked:
            raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    out = tmp_path / "out.safetensors"
    prune = ["prune", str(lenet_checkpoint), "--ratio", "0.3", "--no-evaluate"]
    _assert_clean_failure(runner.invoke(app, [*prune, "-o", str(locked / "x.safetensors")]), "cannot write", "-o")
    _assert_clean_failure(runner.invoke(app, [*prune, "-o", str(out), "--report", str(locked / "r.json")]),
                          "cannot write", "--report")
    assert not out.exists() and list(locked.iterdir()) == []


def test_foreign_weight_files_get_one_line(runner: CliRunner, tmp_path: Path) -> None:
    model = create_model("lenet5")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    scripted = tmp_path / "scripted.pt"
    torch.jit.trace(model, torch.zeros(1, 1, 28, 28)).save(str(scripted))
    whole = tmp_path / "whole.pth"
    torch.save(model, whole)
    misnamed = tmp_path / "weights.safetensors"  # a state-dict pickle under a safetensors name
    torch.save(model.state_dict(), misnamed)
    cases = {empty: "is empty", scripted: "TorchScript", whole: "never unpickles", misnamed: None}
    for path, fragment in cases.items():
        out = tmp_path / f"{path.stem}-out.safetensors"
        result = _import(runner, path, out)
        if fragment is None:  # told apart by content, not suffix: it imports
            assert result.exit_code == 0, result.output
            continue
        _assert_clean_failure(result, fragment)
        assert "\x1b[" not in result.output and not out.exists()


def test_non_finite_recipe_values_are_refused(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path) -> None:
    out = tmp_path / "out.safetensors"
    for value in ("inf", "-inf"):
        result = runner.invoke(app, ["train", str(lenet_checkpoint), "--lr", value, "-o", str(out)])
        _assert_clean_failure(result, "train.lr")
    assert not out.exists()


def test_diverging_training_stops_and_writes_nothing(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path) -> None:
    root = tmp_path / "mnist-data"
    write_mnist(root / "MNIST" / "raw", n_train=200, n_test=40)
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["train", str(lenet_checkpoint), "--dataset", "mnist", "--data-root", str(root),
                                 "--lr", "90", "--max-steps", "20", "--batch-size", "32", "-o", str(out)])
    _assert_clean_failure(result, "training diverged", "lower the learning rate")
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.parametrize("command", [["prune", "--ratio", "0.5"], ["quantize"], ["train", "--max-steps", "1"],
                                     ["score"], ["export"]])
def test_a_recipe_for_another_architecture_is_refused_before_any_work(runner: CliRunner, tmp_path: Path,
                                                                      lenet_checkpoint: Path, command: list[str]) -> None:
    """The recipe's model: section would be dropped without a word, and its settings were tuned for that model."""
    recipe = tmp_path / "resnet20.yaml"
    recipe.write_text("model:\n  arch: resnet20\n")
    name, *extra = command
    out = tmp_path / ("out.onnx" if name == "export" else "out.safetensors")
    args = [name, str(lenet_checkpoint), "-r", str(recipe), *extra] + ([] if name == "score" else ["-o", str(out)])
    before = sorted(p.name for p in tmp_path.iterdir())
    _assert_clean_failure(runner.invoke(app, args), "'lenet5' checkpoint", "model.arch is 'resnet20'")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("role, length, fragment", [
    ("output", 300, "output file name is 312 bytes long; at most 241 fit"),
    ("output", 243, "output file name is 255 bytes long; at most 241 fit"),  # legal, but its temporary file is not
    ("report", 300, "report file name is 305 bytes long"),
    ("checkpoint", 300, "(File name too long); check the path"),
    ("recipe", 300, "(File name too long); check the path"),
    ("data-root", 300, "(File name too long); pass a readable --data-root"),
])
def test_names_the_system_cannot_take_are_refused_before_any_work(runner: CliRunner, tmp_path: Path,
                                                                  lenet_checkpoint: Path, role: str, length: int,
                                                                  fragment: str) -> None:
    long = tmp_path / ("n" * length)
    args = {"output": ["-o", f"{long}.safetensors"], "report": ["-o", str(tmp_path / "q.safetensors"),
                                                                "--report", f"{long}.json"],
            "checkpoint": ["-o", str(tmp_path / "q.safetensors")], "recipe": ["-r", f"{long}.yaml", "-o",
                                                                             str(tmp_path / "q.safetensors")],
            "data-root": ["--data-root", str(long), "-o", str(tmp_path / "q.safetensors")]}[role]
    source = f"{long}.safetensors" if role == "checkpoint" else str(lenet_checkpoint)
    evaluate = [] if role == "data-root" else ["--no-evaluate"]
    result = runner.invoke(app, ["quantize", source, "--bits", "4", *evaluate, *args])
    _assert_clean_failure(result, fragment)
    assert not (tmp_path / "q.safetensors").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_an_output_that_is_a_symlink_loop_is_refused(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path) -> None:
    (tmp_path / "a.safetensors").symlink_to(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "a.safetensors")
    result = runner.invoke(app, ["quantize", str(lenet_checkpoint), "--no-evaluate", "-o", str(tmp_path / "a.safetensors"),
                                 "--force"])
    _assert_clean_failure(result, "Symlink loop")
    assert (tmp_path / "a.safetensors").is_symlink()
