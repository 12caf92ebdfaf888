"""`export` and `dnnprune export`: ONNX with a dynamic batch axis that onnxruntime runs like PyTorch,
on every kind of checkpoint dnnprune writes, and clean refusals that write nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import dnnprune
from dnnprune.checkpoint import CheckpointMeta, attach_meta, save
from dnnprune.cli import app
from dnnprune.errors import DnnpruneError
from dnnprune.models import create_model
from dnnprune.onnx_export import export
from dnnprune.pruning import prune
from dnnprune.pruning.double import double_prune
from dnnprune.quantization import quantize_layers
from dnnprune.recipe import DoublePruneSection, ExportSection, PruneSection, QuantizeSection
from dnnprune.tasks import TaskSpec
from tests.cli.test_bad_input import _assert_clean_failure
from tests.conftest import make_checkpoint

QUICK = ExportSection(batch_sizes=[1, 3], repeats=2)
A2E_ARGS = {"input_shape": [1, 1, 30], "widths": [64, 16, 64], "activation": "tanh"}


def _saved(model: torch.nn.Module, path: Path) -> Path:
    save(model, path)
    return path


def _calibrated(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    """BatchNorm statistics from random batches, so that an untrained torchvision net gives outputs
    of order one (freshly built, MobileNetV3 returns logits of about 1e-10, which compare trivially)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.momentum = None  # a cumulative average
    model.train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *shape, generator=generator))
    for module in norms:
        module.momentum = 0.1  # a saved momentum=None does not load back (checkpoint._same_kind)
    return model.eval()


def _build(kind: str, folder: Path, lenet: Path) -> Path:
    path = folder / f"{kind.replace('.', '_')}.safetensors"
    if kind == "pruned":
        model, _ = prune(dnnprune.load(lenet), PruneSection(ratio=0.5, evaluate=False))
    elif kind == "quantized":
        model = dnnprune.load(lenet)
        quantize_layers(model, QuantizeSection(method="kmeans", bits=4, layers=["type:Linear"],
                                               layer_bits={"type:Conv2d": 6}))
    elif kind == "sparse":
        model, _ = double_prune(dnnprune.load(lenet), DoublePruneSection(slimming_ratio=0, sparsity=0.8, evaluate=False))
    elif kind == "layer-pruned":
        resnet = make_checkpoint(folder / "resnet20.safetensors", "resnet20", input_shape=(1, 32, 32))
        model, _ = prune(dnnprune.load(resnet), PruneSection(granularity="layer", remove=1, evaluate=False))
    elif kind == "a2e":
        torch.manual_seed(0)
        model = attach_meta(create_model("a2e", **A2E_ARGS),
                            CheckpointMeta(arch="a2e", arch_args=A2E_ARGS, input_shape=(1, 1, 30),
                                           task=TaskSpec(kind="reconstruction")))
    else:  # a torchvision classifier, random weights, small input
        fresh = make_checkpoint(folder / f"{kind}-fresh.safetensors", kind, input_shape=(3, 32, 32))
        model = _calibrated(dnnprune.load(fresh), (3, 32, 32))
    return _saved(model, path)


KINDS = ["pruned", "quantized", "sparse", "layer-pruned", "a2e", "torchvision.resnet18",
         "torchvision.mobilenet_v3_small"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("export-checkpoints")
    torch.manual_seed(0)
    lenet = make_checkpoint(folder / "lenet5.safetensors")
    return {kind: _build(kind, folder, lenet) for kind in KINDS}


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _assert_runs_like_pytorch(model: torch.nn.Module, path: Path, shape: tuple[int, ...]) -> None:
    """Batch sizes other than the export's (2) and the parity check's (8): the batch axis is dynamic."""
    generator = torch.Generator().manual_seed(7)
    for batch in (1, 5):
        x = torch.randn(batch, *shape, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        got = _run_onnx(path, x)
        assert got.shape == expected.shape and got.shape[0] == batch
        assert np.abs(expected).max() > 1e-3  # outputs worth comparing
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def _check_report(report: Any, model: torch.nn.Module, out: Path) -> None:
    meta = dnnprune.meta_of(model)
    assert out.is_file() and out.stat().st_size == report.onnx_bytes
    assert report.parity["passed"] and report.parity["samples"] == 8
    assert report.parity["max_abs_diff"] <= 1e-4 and report.parity["max_abs_diff"] <= report.parity["bound"]
    assert report.input_shape[0] not in (1, 2, 8) and report.input_shape[1:] == list(meta.input_shape)
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # a named, symbolic batch axis
    assert report.dense_layers == sorted(meta.encodings)
    # quantized and sparse weights are written dense: the file holds each of them as float32
    state = model.state_dict()
    assert report.onnx_bytes >= 4 * sum(state[name].numel() for name in meta.encodings)
    assert [row["batch_size"] for row in report.latency] == [1, 3]
    assert all(row["torch_ms"] > 0 and row["onnxruntime_ms"] > 0 for row in report.latency)
    assert all(row["speedup"] == pytest.approx(row["torch_ms"] / row["onnxruntime_ms"]) for row in report.latency)


@pytest.mark.parametrize("kind", KINDS)
def test_export_matches_pytorch_at_any_batch_size(kind: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = dnnprune.load(checkpoints[kind])
    out = tmp_path / "model.onnx"
    _, report = export(model, QUICK, output=out)
    assert report.exporter == "torchscript"
    _check_report(report, model, out)
    _assert_runs_like_pytorch(model, out, tuple(dnnprune.meta_of(model).input_shape))
    encoded = dnnprune.meta_of(model).encodings
    if kind in ("quantized", "sparse"):
        assert set(encoded) == {f"{m}.weight" for m in ("features.0", "features.3", "classifier.1", "classifier.3",
                                                         "classifier.5")}
    else:
        assert report.dense_layers == []
    if kind == "layer-pruned":
        assert dnnprune.meta_of(model).replaced  # a block is gone from the model that was exported
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("kind", ["a2e", pytest.param("quantized", marks=pytest.mark.slow),
                                  pytest.param("layer-pruned", marks=pytest.mark.slow),
                                  pytest.param("torchvision.mobilenet_v3_small", marks=pytest.mark.slow)])
def test_dynamo_exporter_also_gives_a_dynamic_batch_axis(kind: str, checkpoints: dict[str, Path],
                                                          tmp_path: Path) -> None:
    model = dnnprune.load(checkpoints[kind])
    out = tmp_path / "model.onnx"
    _, report = export(model, QUICK.model_copy(update={"exporter": "dynamo"}), output=out)
    assert report.exporter == "dynamo"
    _check_report(report, model, out)
    _assert_runs_like_pytorch(model, out, tuple(dnnprune.meta_of(model).input_shape))


class _Skewed:
    """An onnxruntime session whose outputs are off by `delta`: what a wrong export would give."""

    def __init__(self, session: Any, delta: float) -> None:
        self.session, self.delta = session, delta

    def get_inputs(self) -> Any:
        return self.session.get_inputs()

    def run(self, names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [out + np.float32(self.delta) for out in self.session.run(names, feed)]


def _skew(monkeypatch: pytest.MonkeyPatch, delta: float) -> None:
    import dnnprune.onnx_export as module

    real = module.onnx_session
    monkeypatch.setattr(module, "onnx_session", lambda payload: _Skewed(real(payload), delta))


def test_a_mismatch_fails_and_writes_nothing(checkpoints: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _skew(monkeypatch, 1e-3)
    out = tmp_path / "model.onnx"
    with pytest.raises(DnnpruneError, match=r"differs from PyTorch by 0\.001.*nothing was written"):
        export(dnnprune.load(checkpoints["a2e"]), QUICK, output=out)
    assert list(tmp_path.iterdir()) == []


def test_tiny_outputs_are_compared_at_their_own_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits of ~1e-6 off by 1e-6 are wrong by 100 %, which an absolute 1e-4 bound would accept."""
    model = create_model("a2e", **A2E_ARGS)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(1e-3)
                module.bias.zero_()
    attach_meta(model, CheckpointMeta(arch="a2e", arch_args=A2E_ARGS, input_shape=(1, 1, 30),
                                      task=TaskSpec(kind="reconstruction")))
    out = tmp_path / "model.onnx"
    _, report = export(model, QUICK.model_copy(update={"latency": False}), output=out)
    assert report.parity["max_abs_output"] < 1e-4 and report.parity["bound"] < 1e-8
    out.unlink()
    _skew(monkeypatch, 1e-6)
    with pytest.raises(DnnpruneError, match="times the largest output"):
        export(model, QUICK, output=out)
    assert not out.exists()


def test_large_outputs_are_compared_at_their_own_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs of ~1e5 differ by ~1e-2 from float32 rounding alone: a correct export an absolute 1e-4
    bound refused. A 1e-3 relative error is still caught."""
    torch.manual_seed(0)
    model = create_model("a2e", **A2E_ARGS)
    with torch.no_grad():
        model.net[-1].weight.mul_(1e6)
    attach_meta(model, CheckpointMeta(arch="a2e", arch_args=A2E_ARGS, input_shape=(1, 1, 30),
                                      task=TaskSpec(kind="reconstruction")))
    out = tmp_path / "model.onnx"
    _, report = export(model, QUICK.model_copy(update={"latency": False}), output=out)
    assert report.parity["max_abs_output"] > 1e4 and report.parity["bound"] > 1.0
    out.unlink()
    _skew(monkeypatch, 1e-3 * report.parity["max_abs_output"])
    with pytest.raises(DnnpruneError, match="times the largest output"):
        export(model, QUICK, output=out)
    assert not out.exists()


def test_an_exporter_failure_is_one_line_with_nothing_on_stdout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capfd: pytest.CaptureFixture[str]) -> None:
    """torch's TorchScript exporter dumps the whole graph to the process's stdout (from C++) when it fails."""
    import os

    def failing_export(*args: Any, **kwargs: Any) -> None:
        os.write(1, b"Torch IR graph at exception: graph(%input.1 : Float(*, 1, 32, 32)\n")
        raise RuntimeError("Unsupported: ONNX export of operator adaptive_avg_pool2d\nsecond line")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    model = attach_meta(create_model("a2e", **A2E_ARGS), CheckpointMeta(
        arch="a2e", arch_args=A2E_ARGS, input_shape=(1, 1, 30), task=TaskSpec(kind="reconstruction")))
    with pytest.raises(DnnpruneError, match=r"adaptive_avg_pool2d\); try --exporter dynamo$") as raised:
        export(model, QUICK, output=tmp_path / "model.onnx")
    assert "second line" not in str(raised.value)
    assert capfd.readouterr().out == ""
    print("stdout works again")
    assert capfd.readouterr().out == "stdout works again\n"
    assert list(tmp_path.iterdir()) == []


def test_a_model_with_nan_output_is_refused(tmp_path: Path) -> None:
    model = create_model("a2e", **A2E_ARGS)
    with torch.no_grad():
        model.net[1].bias.fill_(float("nan"))
    attach_meta(model, CheckpointMeta(arch="a2e", arch_args=A2E_ARGS, input_shape=(1, 1, 30),
                                      task=TaskSpec(kind="reconstruction")))
    with pytest.raises(DnnpruneError, match="not finite"):
        export(model, QUICK, output=tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the command


def test_cli_export_writes_onnx_and_report(runner: CliRunner, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sparse.onnx"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("export:\n  batch_sizes: [2]\n  repeats: 2\n")
    result = runner.invoke(app, ["export", str(checkpoints["sparse"]), "-o", str(out), "-r", str(recipe)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "sparse.export.json").read_text())
    assert report["command"] == "export" and report["inputs"]["checkpoint"] == str(checkpoints["sparse"])
    assert report["output"] == str(out) and report["onnx_bytes"] == out.stat().st_size
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] <= 1e-4
    assert len(report["dense_layers"]) == 5 and [row["batch_size"] for row in report["latency"]] == [2]
    assert "written dense" in result.output and "max |diff|" in result.output
    _assert_runs_like_pytorch(dnnprune.load(checkpoints["sparse"]), out, (1, 28, 28))


def test_cli_export_without_latency_and_with_a_report_path(runner: CliRunner, checkpoints: dict[str, Path],
                                                           tmp_path: Path) -> None:
    out, report_path = tmp_path / "m.onnx", tmp_path / "elsewhere.json"
    result = runner.invoke(app, ["export", str(checkpoints["quantized"]), "-o", str(out), "--no-latency",
                                 "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["latency"] == [] and report["dense_layers"] == sorted(dnnprune.meta_of(
        dnnprune.load(checkpoints["quantized"])).encodings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.json", "m.onnx"]


@pytest.mark.parametrize("case", ["suffix", "exists", "report-exists", "input", "missing", "folder", "exporter",
                                  "tolerance"])
def test_cli_bad_input_fails_in_one_line_and_writes_nothing(case: str, runner: CliRunner,
                                                            checkpoints: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = checkpoints["a2e"]
    out = tmp_path / "model.onnx"
    extra: list[str] = []
    fragment = ""
    if case == "suffix":
        out, fragment = tmp_path / "model.safetensors", "must end in .onnx"
    elif case == "exists":
        out.write_bytes(b"keep me")
        fragment = "already exists"
    elif case == "report-exists":
        (tmp_path / "model.export.json").write_text("{}")
        fragment = "already exists"
    elif case == "input":  # a checkpoint that happens to be named .onnx is never overwritten
        out.write_bytes(checkpoint.read_bytes())
        checkpoint, extra, fragment = out, ["--force"], "is an input file"
    elif case == "missing":
        checkpoint, fragment = tmp_path / "nope.safetensors", "not found"
    elif case == "folder":
        out, fragment = tmp_path / "no" / "model.onnx", "does not exist"
    elif case == "exporter":
        extra, fragment = ["--exporter", "tflite"], "export.exporter"
    elif case == "tolerance":
        extra, fragment = ["--tolerance", "0"], "export.tolerance"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = runner.invoke(app, ["export", str(checkpoint), "-o", str(out), *extra])
    _assert_clean_failure(result, fragment)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_cli_same_path_for_output_and_input_is_refused(runner: CliRunner, checkpoints: dict[str, Path]) -> None:
    checkpoint = checkpoints["a2e"]
    before = checkpoint.read_bytes()
    result = runner.invoke(app, ["export", str(checkpoint), "-o", str(checkpoint), "--force"])
    _assert_clean_failure(result)
    assert checkpoint.read_bytes() == before


def test_cli_force_overwrites_an_old_export(runner: CliRunner, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")
    (tmp_path / "model.export.json").write_text("{}")
    result = runner.invoke(app, ["export", str(checkpoints["a2e"]), "-o", str(out), "--force", "--no-latency"])
    assert result.exit_code == 0, result.output
    assert onnx.load(str(out)).graph.input[0].name == "input"
    assert json.loads((tmp_path / "model.export.json").read_text())["command"] == "export"


def test_raw_inputs_put_the_normalisation_inside_the_graph_and_the_metadata_says_what_to_feed(
        checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = dnnprune.load(checkpoints["pruned"])
    meta = dnnprune.meta_of(model)
    raw, scaled = tmp_path / "raw.onnx", tmp_path / "scaled.onnx"
    _, raw_report = export(model, QUICK.model_copy(update={"raw_inputs": True, "latency": False}), output=raw)
    _, scaled_report = export(model, QUICK.model_copy(update={"latency": False}), output=scaled)
    pixels = torch.rand(5, *meta.input_shape, generator=torch.Generator().manual_seed(3))
    mean, std = torch.tensor(meta.mean).view(1, -1, 1, 1), torch.tensor(meta.std).view(1, -1, 1, 1)
    with torch.inference_mode():
        expected = model((pixels - mean) / std).numpy()
    outputs = {}
    for path, feed in ((raw, pixels), (scaled, (pixels - mean) / std)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs[path] = session.run(None, {session.get_inputs()[0].name: feed.numpy()})[0]
        described = json.loads(session.get_modelmeta().custom_metadata_map["dnnprune"])
        assert described["mean"] == list(meta.mean) and described["input_shape"][1:] == list(meta.input_shape)
        assert described["classes"] == meta.classes
    assert np.abs(outputs[raw] - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.abs(outputs[scaled] - expected).max() <= 1e-4 * np.abs(expected).max()
    assert raw_report.raw_inputs and "inside the graph" in raw_report.preprocessing["expects"]
    assert not scaled_report.raw_inputs and "(x - mean) / std" in scaled_report.preprocessing["expects"]


def test_an_autoencoder_is_not_exported_with_raw_inputs_and_its_metadata_names_the_normal_labels(
        checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Raw inputs with an output in scaled units invited an anomaly score across the two spaces (ROC-AUC 0.53
    against 0.79 in a helper's run)."""
    model = dnnprune.load(checkpoints["a2e"])
    with pytest.raises(DnnpruneError, match="--raw-inputs does not suit an autoencoder"):
        export(model, QUICK.model_copy(update={"raw_inputs": True, "latency": False}), output=tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()
    _, report = export(model, QUICK.model_copy(update={"latency": False}), output=tmp_path / "b.onnx")
    assert "reconstruction of the scaled input" in report.preprocessing["output"]
    assert report.preprocessing["normal_labels"] == []


def test_raw_inputs_warn_about_columns_float32_cannot_hold_finely_enough() -> None:
    """A timestamp column near 1.7e9 with a spread of 1e3 lost a tenth of its spread as float32 input, and 10 of
    2,000 predictions flipped in a helper's run; export now says so."""
    from dnnprune.onnx_export import _float32_columns

    meta = CheckpointMeta(arch="mlp", arch_args={}, input_shape=(1, 1, 2), features=["ts", "amount"],
                          feature_mean=[1.7e9, 50.0], feature_std=[1e3, 20.0], dataset="csv")
    warned = _float32_columns(meta)
    assert len(warned) == 1 and "'ts'" in warned[0] and "1 column(s)" in warned[0]
    assert _float32_columns(meta.model_copy(update={"feature_mean": [1.0, 50.0]})) == []
