"""`dnnprune info`: what a checkpoint holds and where it came from, read from its header alone."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import dnnprune
import dnnprune.checkpoint
import dnnprune.codecs.state
import dnnprune.info
from dnnprune.checkpoint import CheckpointMeta, attach_meta, file_sha256, save
from dnnprune.cli import app
from dnnprune.info import describe
from dnnprune.metrics import count_macs, count_nonzero_parameters, count_parameters
from dnnprune.models import create_model
from dnnprune.pruning import prune
from dnnprune.pruning.double import double_prune
from dnnprune.quantization import quantize
from dnnprune.recipe import DoublePruneSection, PruneSection, QuantizeSection
from tests.cli.test_bad_input import _assert_clean_failure
from tests.conftest import make_checkpoint


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Table cells on one line each, so that the assertions can read them."""
    from dnnprune.cli._app import console

    monkeypatch.setattr(console, "width", 200)


def _info_json(runner: CliRunner, path: Path, *options: str) -> dict:
    result = runner.invoke(app, ["info", str(path), "--json", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _rows(report: dict) -> dict[str, dict]:
    return {row["tensor"]: row for row in report["layers"]}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """import -> prune (channels, ratio 0.5) -> quantize (k-means 5-bit fc), each step saved: the lineage
    the library commands record."""
    folder = tmp_path_factory.mktemp("info-chain")
    torch.manual_seed(0)
    weights = folder / "resnet20.pth"
    torch.save(create_model("resnet20", num_classes=10, in_channels=1).state_dict(), weights)
    imported = folder / "imported.safetensors"
    result = CliRunner().invoke(app, ["import", str(weights), "--arch", "resnet20", "--input-shape", "1,32,32",
                                      "--dataset", "fashion-mnist", "-o", str(imported)])
    assert result.exit_code == 0, result.output
    pruned, quantized = folder / "pruned.safetensors", folder / "quantized.safetensors"
    model, _ = prune(dnnprune.load(imported), PruneSection(ratio=0.5, evaluate=False))
    save(model, pruned)
    model, _ = quantize(dnnprune.load(pruned), QuantizeSection(method="kmeans", bits=5, layers=["type:Linear"],
                                                               evaluate=False))
    save(model, quantized)
    return [imported, pruned, quantized]


def test_json_shows_architecture_widths_encodings_and_lineage(runner: CliRunner, chain: list[Path]) -> None:
    imported, pruned, quantized = chain
    report = _info_json(runner, quantized)
    model = dnnprune.load(quantized)
    assert report["arch"] == "resnet20" and report["arch_args"] == {"in_channels": 1, "num_classes": 10}
    assert report["task"]["kind"] == "classification" and report["dataset"] == "fashion-mnist"
    assert report["input_shape"] == [1, 32, 32] and len(report["classes"]) == 10
    assert report["params"] == count_parameters(model) and report["file_bytes"] == quantized.stat().st_size
    assert report["built"] is False and report["nonzero_params"] is None
    rows = _rows(report)
    assert list(rows) == [name for name, tensor in model.state_dict().items()  # model order
                          if name.endswith("weight") and tensor.dim() >= 2]
    for name in ("layer3.0.conv1.weight", "layer3.2.conv2.weight"):
        assert (rows[name]["width"], rows[name]["original_width"]) == (32, 64)
        assert rows[name]["original_shape"] == [64, 64 if name.endswith("conv2.weight") else 32, 3, 3]
        assert rows[name]["encoding"] == "float32"
    assert (rows["layer1.0.conv1.weight"]["width"], rows["layer1.0.conv1.weight"]["original_width"]) == (8, 16)
    assert rows["fc.weight"]["shape"] == [10, 32] and rows["fc.weight"]["original_shape"] == [10, 64]
    assert rows["fc.weight"]["encoding"] == "kmeans 5-bit" and rows["fc.weight"]["bits"] == 5
    assert [entry["command"] for entry in report["lineage"]] == ["import", "prune", "quantize"]
    assert report["lineage"][1]["parent_sha256"] == file_sha256(imported)
    assert report["lineage"][2]["parent_sha256"] == file_sha256(pruned)
    assert report["lineage"][1]["metrics"]["params"] == count_parameters(dnnprune.load(pruned))
    assert report["macs"] == report["lineage"][1]["metrics"]["macs"] and "lineage" in report["macs_note"]


def test_table_shows_widths_storage_and_the_lineage_as_a_tree(runner: CliRunner, chain: list[Path]) -> None:
    result = runner.invoke(app, ["info", str(chain[-1])])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "resnet20" in text and "classification" in text and "(1, 32, 32)" in text
    assert "fashion-mnist, 10 classes" in " ".join(text.replace("│", " ").split())
    assert f"{count_parameters(dnnprune.load(chain[-1])):,}" in text
    assert re.search(r"layer3\.0\.conv1\.weight .* 32x16x3x3 .* 64x32x3x3 .* 32 / 64 .* float32", text)
    assert re.search(r"fc\.weight .* 10x32 .* 10x64 .* 10 / 10 .* kmeans 5-bit", text)
    # one branch per step, each under its parent: import at the root, quantize deepest
    depth = {}
    for line in text.splitlines():
        match = re.match(r"^([ │]*)└── (import|prune|quantize)\b", line)
        if match:
            depth[match.group(2)] = len(match.group(1))
    assert list(depth) == ["import", "prune", "quantize"]
    assert depth["import"] < depth["prune"] < depth["quantize"]
    sha = file_sha256(chain[1])[:12]
    assert f"parent {sha}" in text  # quantize names the pruned file as its parent
    assert text.index("└── prune") < text.index(f"parent {sha}")


def test_build_counts_macs_and_nonzeros_on_the_loaded_model(runner: CliRunner, chain: list[Path]) -> None:
    report = _info_json(runner, chain[-1], "--build")
    model = dnnprune.load(chain[-1])
    assert report["built"] is True
    assert report["macs"] == sum(count_macs(model, (1, 32, 32)).values())
    assert report["nonzero_params"] == count_nonzero_parameters(model)
    assert report["params"] == count_parameters(model)
    counted = _info_json(runner, chain[-1], "--count-nonzero")
    assert counted["nonzero_params"] == count_nonzero_parameters(model) and counted["built"] is False


@pytest.fixture(scope="module")
def sparse_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("info-sparse")
    torch.manual_seed(0)
    base = make_checkpoint(folder / "lenet5.safetensors")
    sparse, stacked = folder / "sparse.safetensors", folder / "sparse-kmeans.safetensors"
    model, _ = double_prune(dnnprune.load(base), DoublePruneSection(slimming_ratio=0, sparsity=0.8, evaluate=False))
    save(model, sparse)
    model, _ = quantize(dnnprune.load(sparse), QuantizeSection(method="kmeans", bits=4, layers=["type:Linear", "type:Conv2d"],
                                                              evaluate=False))
    save(model, stacked)
    return sparse, stacked


def test_sparse_encodings_show_their_density_and_exact_nonzeros(runner: CliRunner,
                                                                sparse_checkpoints: tuple[Path, Path]) -> None:
    sparse, stacked = sparse_checkpoints
    for path, value_bits in ((sparse, 32), (stacked, 4)):
        model = dnnprune.load(path)
        report = _info_json(runner, path, "--count-nonzero")
        assert report["nonzero_params"] == count_nonzero_parameters(model)
        state = model.state_dict()
        rows = _rows(report)
        assert set(rows) == {f"{m}.weight" for m in ("features.0", "features.3", "classifier.1", "classifier.3",
                                                     "classifier.5")}
        for name, row in rows.items():
            weight = state[name]
            nonzero = int(torch.count_nonzero(weight))
            assert row["encoding"].startswith("sparse (") and row["bits"] == value_bits
            assert nonzero <= row["stored_entries"] <= nonzero + weight.numel() // 255  # fillers bridge long gaps
            assert row["density"] == pytest.approx(row["stored_entries"] / weight.numel())
        assert rows["classifier.1.weight"]["density"] == pytest.approx(0.2, abs=0.02)  # sparsity 0.8
        if value_bits == 4:
            assert rows["classifier.1.weight"]["encoding"].endswith("+ kmeans 4-bit")
        assert [entry["command"] for entry in report["lineage"]] == (
            ["double-prune"] if path == sparse else ["double-prune", "quantize"])
    result = runner.invoke(app, ["info", str(stacked)])
    assert result.exit_code == 0 and "sparse (" in result.output and "kmeans 4-bit" in result.output


@pytest.mark.parametrize("remove", [1, 8])
def test_layer_pruning_shows_the_removed_blocks(remove: int, runner: CliRunner, tmp_path: Path) -> None:
    base = make_checkpoint(tmp_path / "resnet20.safetensors", "resnet20", input_shape=(1, 32, 32))
    model, _ = prune(dnnprune.load(base), PruneSection(granularity="layer", remove=remove, evaluate=False))
    save(model, tmp_path / "shallow.safetensors")
    report = _info_json(runner, tmp_path / "shallow.safetensors")
    model = dnnprune.load(tmp_path / "shallow.safetensors")
    assert len(report["replaced"]) == remove
    rows = _rows(report)
    removed = {name for name, row in rows.items() if row["encoding"] == "removed"}
    assert all(rows[name]["shape"] is None and rows[name]["width"] == 0 for name in removed)
    assert removed == {f"{block}.{conv}.weight" for block in report["replaced"] for conv in ("conv1", "conv2")}
    assert not removed & set(model.state_dict())
    for block, how in report["replaced"].items():
        if how != "Identity":  # a downsampling block became its shortcut: its 1x1 conv lives on, one level up
            assert how == {"kind": "shortcut", "source": "shortcut"}
            kept = rows[f"{block}.0.weight"]
            assert kept["encoding"] == "float32" and kept["shape"] == kept["original_shape"] is not None
    if remove == 8:  # 8 of 9 blocks: at least one of the two downsampling blocks is among them
        assert any(how != "Identity" for how in report["replaced"].values())
    assert report["params"] == count_parameters(model)
    text = runner.invoke(app, ["info", str(tmp_path / "shallow.safetensors")]).output
    assert all(f"{block} -> " in text for block in report["replaced"]) and "removed" in text


def test_all_lists_unchanged_layers_too(runner: CliRunner, lenet_checkpoint: Path) -> None:
    short = runner.invoke(app, ["info", str(lenet_checkpoint)])
    full = runner.invoke(app, ["info", str(lenet_checkpoint), "--all"])
    assert short.exit_code == full.exit_code == 0
    assert "features.0.weight" not in short.output and "(no lineage recorded)" in short.output
    assert "features.0.weight" in full.output and re.search(r"classifier\.5\.weight .* 10 / 10 .* float32", full.output)


# ----------------------------------------------------------------------------- header-only speed


@pytest.fixture(scope="module")
def large_sparse(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """An MLP of 130 M parameters (520 MB decoded), 98 % zeros, stored sparse: a 13 MB file."""
    hidden = 11_000
    args = {"num_classes": 10, "in_channels": 1, "input_size": 28, "hidden": [hidden, hidden]}
    with torch.device("meta"):
        model = create_model("mlp", **args)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("weight"):
            dense = torch.zeros(tensor.shape)
            picks = torch.randint(0, dense.numel(), (dense.numel() // 50,), generator=generator)
            dense.view(-1)[picks] = torch.randn(picks.numel(), generator=generator)
            state[name] = dense
        else:
            state[name] = torch.randn(tensor.shape, generator=generator)
    model.load_state_dict(state, assign=True)
    nonzero = sum(int(torch.count_nonzero(t)) for t in state.values())
    meta = CheckpointMeta(arch="mlp", arch_args=args, input_shape=(1, 28, 28),
                          encodings={name: {"sparse": {"index_bits": 8}} for name in state if name.endswith("weight")})
    path = tmp_path_factory.mktemp("info-large") / "large.safetensors"
    save(attach_meta(model, meta), path)
    return path, sum(t.numel() for t in state.values()), nonzero


def _forbid_reading_tensors(patch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("info read or decoded the tensors")

    for module, name in ((dnnprune.checkpoint, "load"), (dnnprune.info, "load"), (dnnprune.checkpoint, "decode_state"),
                         (dnnprune.checkpoint, "read_checkpoint_bytes"), (dnnprune.codecs.state, "decode_tensor"),
                         (dnnprune.info, "decode_tensor")):
        patch.setattr(module, name, refuse)


def test_a_large_checkpoint_is_described_from_its_header(runner: CliRunner, large_sparse: tuple[Path, int, int],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path, params, nonzero = large_sparse
    assert params * 4 > 500e6 and path.stat().st_size < params * 4 / 30
    with monkeypatch.context() as patch:
        _forbid_reading_tensors(patch)
        start = time.perf_counter()
        report = describe(path)
        assert time.perf_counter() - start < 1.0
        start = time.perf_counter()
        result = runner.invoke(app, ["info", str(path), "--all"])
        assert time.perf_counter() - start < 1.0
        with pytest.raises(AssertionError, match="read or decoded"):  # the guard does catch a full read
            describe(path, build=True)
    assert report.params == params and report.arch == "mlp"
    rows = {row["tensor"]: row for row in report.layers}
    assert rows["classifier.3.weight"]["shape"] == [11_000, 11_000]
    assert rows["classifier.3.weight"]["density"] == pytest.approx(0.02, rel=0.05)
    assert result.exit_code == 0, result.output
    assert f"{params:,}" in result.output and "sparse (2.0% stored)" in result.output
    assert describe(path, count_nonzero=True).nonzero_params == nonzero  # exact, one tensor at a time


# ----------------------------------------------------------------------------- bad input


def test_bad_files_fail_in_one_line(runner: CliRunner, tmp_path: Path, lenet_checkpoint: Path) -> None:
    pickle = tmp_path / "model.pth"
    torch.save(create_model("lenet5").state_dict(), pickle)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, foreign)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(lenet_checkpoint.read_bytes()[:-100])
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(lenet_checkpoint.read_bytes() + b"\0" * 8)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, I am a text file")
    cases = [(tmp_path / "missing.safetensors", "not found"), (pickle, "pickle"), (foreign, "without dnnprune metadata"),
             (truncated, "truncated"), (padded, "corrupt"), (text, "not a safetensors"), (tmp_path, "is a directory")]
    for path, fragment in cases:
        for options in ([], ["--json"], ["--build"], ["--count-nonzero"]):
            _assert_clean_failure(runner.invoke(app, ["info", str(path), *options]), fragment)


@pytest.mark.parametrize("method, bits", [("linear", 8), ("linear", 4), ("kmeans", 2)])
def test_every_value_codec_is_described_and_counted_exactly(method: str, bits: int, tmp_path: Path,
                                                            lenet_checkpoint: Path) -> None:
    model, _ = quantize(dnnprune.load(lenet_checkpoint), QuantizeSection(method=method, bits=bits, evaluate=False,
                                                                         layers=["type:Linear", "type:Conv2d"]))
    path = save(model, tmp_path / "q.safetensors")
    model = dnnprune.load(path)
    report = describe(path, count_nonzero=True)
    assert report.params == count_parameters(model)
    assert report.nonzero_params == count_nonzero_parameters(model)
    assert {row["tensor"]: (row["shape"], row["encoding"], row["bits"]) for row in report.layers} == {
        name: (list(tensor.shape), f"{method} {bits}-bit", bits) for name, tensor in model.state_dict().items()
        if name.endswith("weight") and tensor.dim() >= 2}


def test_a_checkpoint_without_a_dataset_says_how_to_give_one(runner: CliRunner, tmp_path: Path) -> None:
    weights = tmp_path / "lenet.pth"
    torch.save(create_model("lenet5", num_classes=10, in_channels=1).state_dict(), weights)
    imported = tmp_path / "imported.safetensors"
    assert runner.invoke(app, ["import", str(weights), "--arch", "lenet5", "--input-shape", "1,28,28",
                               "-o", str(imported)]).exit_code == 0
    text = " ".join(runner.invoke(app, ["info", str(imported)]).output.replace("│", " ").split())
    assert "dataset not recorded (commands that need data take --dataset or data.dataset)" in text
