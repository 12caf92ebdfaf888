"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from dnnprune.cli import app
from dnnprune.models import create_model


def _assert_clean_failure(result, *fragments: str) -> None:
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error:"), text
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture
def pickle_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.pth"
    torch.save(create_model("lenet5").state_dict(), path)
    return path


def test_missing_checkpoint(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["score", str(tmp_path / "nope.safetensors")])
    _assert_clean_failure(result, "not found")


def test_truncated_checkpoint(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path) -> None:
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(lenet_checkpoint.read_bytes()[:5000])
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["train", str(truncated), "-o", str(out)])
    _assert_clean_failure(result, "truncated")
    assert not out.exists()


def test_not_safetensors(runner: CliRunner, tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello, I am a text file")
    result = runner.invoke(app, ["score", str(junk)])
    _assert_clean_failure(result, "not a safetensors")


def test_pickle_given_as_checkpoint(runner: CliRunner, pickle_file: Path) -> None:
    result = runner.invoke(app, ["score", str(pickle_file)])
    _assert_clean_failure(result, "pickle", "dnnprune import")


def test_safetensors_without_metadata_says_how_to_import(runner: CliRunner, tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file(create_model("lenet5").state_dict(), str(plain))
    result = runner.invoke(app, ["score", str(plain)])
    _assert_clean_failure(result, "without dnnprune metadata", "dnnprune import")


@pytest.mark.parametrize(
    "recipe_text, fragments",
    [
        ("train:\n  epoch: 3\n", ("train.epoch", "unknown key")),
        ("train:\n  lr: fast\n", ("train.lr",)),
        ("train:\n  lr: -1\n", ("train.lr", "greater than 0")),
        ("trian:\n  lr: 0.1\n", ("trian", "unknown key")),
        ("train: [1, 2\n", ("not valid YAML",)),
    ],
)
def test_bad_recipe(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path, recipe_text: str, fragments: tuple[str, ...]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["train", str(lenet_checkpoint), "-r", str(recipe), "-o", str(out)])
    _assert_clean_failure(result, *fragments)
    assert not out.exists()


def test_missing_recipe_file(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path) -> None:
    result = runner.invoke(app, ["score", str(lenet_checkpoint), "-r", str(tmp_path / "none.yaml")])
    _assert_clean_failure(result, "recipe", "not found")


def test_dataset_not_there(runner: CliRunner, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["train", "lenet5", "--dataset", "mnist", "--data-root", str(empty), "-o", str(out)],
                           env={"DNNPRUNE_DATA": str(empty)})
    _assert_clean_failure(result, "mnist")
    assert not out.exists()


def test_unknown_architecture(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "vgg17", "--dataset", "fashion-mnist", "-o", str(tmp_path / "o.safetensors")])
    _assert_clean_failure(result, "vgg17")


def test_existing_output_needs_force(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path) -> None:
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    result = runner.invoke(app, ["train", str(lenet_checkpoint), "-o", str(out)])
    _assert_clean_failure(result, "--force")
    assert out.read_bytes() == b"keep me"


def test_input_is_never_overwritten(runner: CliRunner, lenet_checkpoint: Path) -> None:
    before = lenet_checkpoint.read_bytes()
    result = runner.invoke(app, ["train", str(lenet_checkpoint), "-o", str(lenet_checkpoint), "--force"])
    _assert_clean_failure(result, "input")
    assert lenet_checkpoint.read_bytes() == before


def test_import_rejects_mismatched_arch(runner: CliRunner, tmp_path: Path, pickle_file: Path) -> None:
    out = tmp_path / "o.safetensors"
    result = runner.invoke(app, ["import", str(pickle_file), "--arch", "vgg11", "-o", str(out)])
    _assert_clean_failure(result, "does not fit --arch vgg11")
    assert not out.exists()


def test_import_refuses_arbitrary_pickled_objects(runner: CliRunner, tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": create_model("lenet5").state_dict(), "hook": print}, evil)
    result = runner.invoke(app, ["import", str(evil), "--arch", "lenet5", "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_bad_device_option(runner: CliRunner, lenet_checkpoint: Path) -> None:
    result = runner.invoke(app, ["score", str(lenet_checkpoint), "--device", "tpu"])
    _assert_clean_failure(result, "--device")


def _special_files(tmp_path: Path) -> dict[str, Path]:
    """A FIFO blocks a reader forever and /dev/zero never ends: neither may be read."""
    import os

    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    return {"fifo": fifo, "device": Path("/dev/zero")}


@pytest.mark.parametrize("kind", ["fifo", "device"])
@pytest.mark.parametrize("role", ["checkpoint", "info", "teacher", "analysis", "recipe", "weights"])
def test_a_pipe_or_device_is_refused_without_reading_it(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path,
                                                        kind: str, role: str) -> None:
    special = str(_special_files(tmp_path)[kind])
    out = str(tmp_path / "out.safetensors")
    lenet = str(lenet_checkpoint)
    args = {
        "checkpoint": ["quantize", special, "--bits", "4", "--no-evaluate", "-o", out],
        "info": ["info", special],
        "teacher": ["quantize", lenet, "--bits", "4", "--teacher", special, "--distill", "0.5", "--finetune-epochs", "1",
                    "-o", out],
        "analysis": ["prune", lenet, "--ratio", "0.3", "--order", "sensitivity", "--analysis", special,
                     "--no-evaluate", "-o", out],
        "recipe": ["prune", lenet, "-r", special, "--ratio", "0.3", "--no-evaluate", "-o", out],
        "weights": ["import", special, "--arch", "lenet5", "-o", out],
    }[role]
    result = runner.invoke(app, args)
    _assert_clean_failure(result, "is not a regular file", "give the path of a saved file")
    assert not Path(out).exists()


@pytest.mark.parametrize("argv, fragment", [
    (["train", "lenet5", "--bogus", "-o", "x.safetensors"], "No such option: --bogus; see 'dnnprune train --help'"),
    (["train", "lenet5", "--lr", "abc", "-o", "x.safetensors"], "Invalid value for '--lr'"),
    (["prune", "model.safetensors"], "Missing option '--output' / '-o'; see 'dnnprune prune --help'"),
    (["bogus"], "No such command 'bogus'; see 'dnnprune --help'"),
])
def test_usage_errors_are_one_line_from_the_console_entry_point(argv: list[str], fragment: str,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """click draws a usage line and a box for these; the entry point gives one line and exit code 2."""
    from dnnprune.cli import main

    monkeypatch.setattr("sys.argv", ["dnnprune", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    assert exited.value.code == 2 and captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], captured.err


def test_the_entry_point_passes_on_success_and_domain_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from dnnprune.cli import main

    for argv, code in ((["--help"], 0), (["score", str(tmp_path / "nope.safetensors")], 2)):
        monkeypatch.setattr("sys.argv", ["dnnprune", *argv])
        with pytest.raises(SystemExit) as exited:
            main()
        assert exited.value.code == code, argv
    assert "not found" in capsys.readouterr().err


def test_version_prints_dnnprune_and_torch_and_exits_zero(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    import dnnprune
    from dnnprune.cli import main

    monkeypatch.setattr("sys.argv", ["dnnprune", "--version"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"dnnprune {dnnprune.__version__} (torch {torch.__version__})"


def test_a_bad_option_value_is_named_as_the_option_not_the_recipe(runner: CliRunner, tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("train:\n  max_steps: 5\n")
    result = runner.invoke(app, ["train", "lenet5", "-r", str(recipe), "--lr", "-0.1", "-o", str(tmp_path / "x.safetensors")])
    _assert_clean_failure(result, "train.lr (set by a command-line option): Input should be greater than 0")


@pytest.mark.parametrize("command", [["double-prune", "--sparsity", "0.5", "--slimming-ratio", "0"],
                                     ["quantize", "--bits", "4"], ["prune", "--ratio", "0.5"]])
def test_a_diverged_checkpoint_is_refused_as_the_input(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path,
                                                       command: list[str]) -> None:
    """NaN weights used to fail later, blamed on the fine-tune's learning rate or on an encoding."""
    import dnnprune

    model = dnnprune.load(lenet_checkpoint)
    with torch.no_grad():
        model.classifier[1].weight[0, 0] = float("nan")
    diverged = dnnprune.save(model, tmp_path / "diverged.safetensors")
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, [command[0], str(diverged), *command[1:], "--no-evaluate", "-o", str(out)])
    _assert_clean_failure(result, "classifier.1.weight holds NaN or inf", "had diverged")
    assert not out.exists()


def test_the_entry_point_imports_nothing_heavy_so_a_ctrl_c_while_starting_is_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """torch takes seconds to import; a Ctrl-C then printed a KeyboardInterrupt traceback."""
    import builtins
    import subprocess
    import sys

    probe = "import sys, dnnprune.cli; print(sorted(m for m in ('torch', 'typer', 'rich') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"

    from dnnprune.cli import main

    real_import = builtins.__import__

    def interrupted(name: str, *args: object, **kwargs: object) -> object:
        if name == "dnnprune.cli._entry":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 130
    assert capsys.readouterr().err == "interrupted while starting; nothing was written\n"
