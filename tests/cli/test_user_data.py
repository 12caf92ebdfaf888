"""A user's own data through the CLI: an image folder of many classes, an MLP on a table, a small dataset
under the commands' default subset sizes, a shuffled table at score, and the data file never written over."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import dnnprune
from dnnprune.cli import app
from tests.cli.test_bad_input import _assert_clean_failure


def _table(path: Path, rows: int = 240, columns: tuple[str, ...] = ("a", "b", "c", "d")) -> Path:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(rows, len(columns)))
    labels = (values[:, 0] + values[:, 1] > 0).astype(int)
    lines = [",".join([*columns, "Class"])] + [",".join([*(f"{v:.5f}" for v in row), str(y)])
                                               for row, y in zip(values, labels)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _recipe(path: Path, body: str = "") -> Path:
    path.write_text("train:\n  epochs: 1\n  batch_size: 32\n" + body)
    return path


def test_an_mlp_trains_on_a_table_and_a_reordered_table_is_refused_at_score(runner: CliRunner, tmp_path: Path) -> None:
    data = _table(tmp_path / "data.csv")
    out = tmp_path / "mlp.safetensors"
    result = runner.invoke(app, ["train", "mlp", "-r", str(_recipe(tmp_path / "r.yaml")), "--dataset", "csv",
                                 "--data-root", str(data), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert dnnprune.meta_of(dnnprune.load(out)).features == ["a", "b", "c", "d"]
    lines = [line.split(",") for line in data.read_text().splitlines()]
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("\n".join(",".join([r[1], r[0], *r[2:]]) for r in lines) + "\n")
    scored = runner.invoke(app, ["score", str(out), "--data-root", str(swapped), "--no-latency"])
    _assert_clean_failure(scored, "column 1 is 'b', the model's is 'a'")


def test_a_report_or_a_side_output_never_lands_on_the_data_file(runner: CliRunner, tmp_path: Path) -> None:
    data = _table(tmp_path / "data.json")
    before = data.read_bytes()
    result = runner.invoke(app, ["train", "mlp", "-r", str(_recipe(tmp_path / "r.yaml")), "--dataset", "csv",
                                 "--data-root", str(data), "-o", str(tmp_path / "m.safetensors"), "--report", str(data),
                                 "--force"])
    _assert_clean_failure(result, "is an input file")
    (tmp_path / "folder").mkdir()
    table = _table(tmp_path / "folder" / "table.csv")
    result = runner.invoke(app, ["train", "mlp", "-r", str(_recipe(tmp_path / "r.yaml")), "--dataset", "csv",
                                 "--data-root", str(table.parent), "-o", str(tmp_path / "m.safetensors"),
                                 "--report", str(table.with_suffix(".json"))])
    assert result.exit_code == 0, result.output
    analyzed = runner.invoke(app, ["analyze", str(tmp_path / "m.safetensors"), "--data-root", str(table), "-o",
                                   str(table.with_suffix(".json")), "--force", "--ratios", "0.5"])
    _assert_clean_failure(analyzed, "is an input file")
    assert data.read_bytes() == before and table.read_text().startswith("a,b,c,d,Class")


def test_a_small_dataset_runs_under_the_default_subset_sizes(runner: CliRunner, tmp_path: Path) -> None:
    """analyze's 2,000 validation samples are a default the user never chose: a table of 240 rows (24 in val)
    is analysed on all of its validation split instead of failing on that number."""
    data = _table(tmp_path / "data.csv")
    out = tmp_path / "mlp.safetensors"
    assert runner.invoke(app, ["train", "mlp", "-r", str(_recipe(tmp_path / "r.yaml")), "--dataset", "csv",
                               "--data-root", str(data), "-o", str(out)]).exit_code == 0
    result = runner.invoke(app, ["analyze", str(out), "--data-root", str(data), "--ratios", "0.5",
                                 "-o", str(tmp_path / "a.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a.json").read_text())["samples"] == 24
    asked = runner.invoke(app, ["analyze", str(out), "--data-root", str(data), "--ratios", "0.5", "--samples", "500",
                                "-o", str(tmp_path / "b.json")])
    _assert_clean_failure(asked, "asked for 500 samples")


def test_an_image_folder_of_three_classes_trains_a_three_way_classifier(runner: CliRunner, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for index, name in enumerate(("cat", "dog", "fox")):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(rng.normal(60 + 70 * index, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / name / f"{i}.png")
    recipe = _recipe(tmp_path / "r.yaml", "data:\n  input_shape: [3, 16, 16]\n  val_fraction: 0.2\n")
    out = tmp_path / "net.safetensors"
    result = runner.invoke(app, ["train", "lenet5", "-r", str(recipe), "--dataset", "imagefolder",
                                 "--data-root", str(tmp_path / "imgs"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    meta = dnnprune.meta_of(dnnprune.load(out))
    assert meta.classes == ["cat", "dog", "fox"] and meta.arch_args["num_classes"] == 3


def test_an_unreadable_image_read_by_a_loader_worker_is_still_one_line(runner: CliRunner, tmp_path: Path) -> None:
    """A DataLoader worker re-raises the error with its own traceback in the message; the user sees the one line."""
    for name in ("cat", "dog"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((16, 16, 3), 30 * i, dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    (tmp_path / "imgs" / "dog" / "3.png").write_bytes(b"not a png")
    recipe = _recipe(tmp_path / "r.yaml", "data:\n  input_shape: [3, 16, 16]\n  workers: 1\n")
    result = runner.invoke(app, ["train", "lenet5", "-r", str(recipe), "--dataset", "imagefolder",
                                 "--data-root", str(tmp_path / "imgs"), "-o", str(tmp_path / "net.safetensors")])
    _assert_clean_failure(result, "cannot read the image", "dog/3.png")
    assert "Traceback" not in result.output and "worker" not in result.output


def test_the_table_scaling_travels_in_the_checkpoint(runner: CliRunner, tmp_path: Path) -> None:
    from dnnprune.data import load_splits

    data = _table(tmp_path / "data.csv")
    out = tmp_path / "mlp.safetensors"
    assert runner.invoke(app, ["train", "mlp", "-r", str(_recipe(tmp_path / "r.yaml")), "--dataset", "csv",
                               "--data-root", str(data), "-o", str(out)]).exit_code == 0
    meta = dnnprune.meta_of(dnnprune.load(out))
    scaling = load_splits("csv", None, path=data).scaling
    assert scaling is not None and meta.feature_mean == list(scaling[0]) and meta.feature_std == list(scaling[1])


def test_a_table_model_exported_with_raw_inputs_scores_the_raw_csv_rows_as_dnnprune_does(runner: CliRunner,
                                                                                          tmp_path: Path) -> None:
    """A deployed table model is fed the file's own values: the ONNX graph must scale them as training did."""
    import onnxruntime as ort
    import torch

    from dnnprune.data import load_splits

    data = _table(tmp_path / "data.csv")
    out = tmp_path / "mlp.safetensors"
    assert runner.invoke(app, ["train", "mlp", "-r", str(_recipe(tmp_path / "r.yaml")), "--dataset", "csv",
                               "--data-root", str(data), "-o", str(out)]).exit_code == 0
    onnx_path = tmp_path / "mlp.onnx"
    result = runner.invoke(app, ["export", str(out), "-o", str(onnx_path), "--raw-inputs", "--no-latency"])
    assert result.exit_code == 0, result.output
    raw = np.loadtxt(data, delimiter=",", skiprows=1, dtype=np.float32)[:, :4].reshape(-1, 1, 1, 4)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: raw})[0]
    model = dnnprune.load(out).eval()
    full = load_splits("csv", None, path=data).train.dataset  # every row, scaled by dnnprune's own pipeline
    with torch.inference_mode():
        expected = model(torch.stack([full[i][0] for i in range(len(full))])).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    described = json.loads(session.get_modelmeta().custom_metadata_map["dnnprune"])
    assert described["features"] == ["a", "b", "c", "d"] and "inside the graph" in described["expects"]
    assert json.loads((tmp_path / "mlp.export.json").read_text())["raw_inputs"] is True


def test_normal_classes_name_the_csv_labels_not_their_positions(runner: CliRunner, tmp_path: Path) -> None:
    """A file labelled 1 (normal) and 2 (anomalous): `normal_classes: [1]` must train on the 1s. Read as a
    position it trained on the anomalies and scored ROC-AUC 0.06 with exit 0."""
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(2, 6))
    x = rng.normal(size=(600, 2)) @ basis + 0.05 * rng.normal(size=(600, 6))
    y = np.ones(600, dtype=int)
    odd = rng.choice(600, 60, replace=False)
    x[odd], y[odd] = 3 * rng.normal(size=(60, 6)), 2
    lines = [",".join([*(f'"f{j}"' for j in range(6)), '"Class"'])]
    lines += [",".join([*(f"{v:.5f}" for v in row), str(label)]) for row, label in zip(x, y)]
    data = tmp_path / "labelled_1_2.csv"
    data.write_text("\n".join(lines) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  task: {kind: reconstruction, normal_classes: [1]}\n  args: {widths: [16, 4, 16]}\n"
                      "train: {epochs: 4, batch_size: 32, optimizer: adam, lr: 0.003, weight_decay: 0}\n")
    out = tmp_path / "a2e.safetensors"
    result = runner.invoke(app, ["train", "a2e", "-r", str(recipe), "--dataset", "csv", "--data-root", str(data),
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert dnnprune.meta_of(dnnprune.load(out)).task.normal_classes == (0,)  # the position of label '1'
    assert json.loads((tmp_path / "a2e.json").read_text())["test"]["roc_auc"] > 0.8
    recipe.write_text(recipe.read_text().replace("normal_classes: [1]", "normal_classes: [0]"))
    wrong = runner.invoke(app, ["train", "a2e", "-r", str(recipe), "--dataset", "csv", "--data-root", str(data),
                                "-o", str(tmp_path / "other.safetensors")])
    _assert_clean_failure(wrong, "model.task.normal_classes: 0 is not one of the data's labels ('1', '2')")


def test_a_holdout_table_is_scored_whole_with_split_all_and_the_default_says_what_it_left_out(
        runner: CliRunner, tmp_path: Path) -> None:
    data = _table(tmp_path / "data.csv")
    out = tmp_path / "mlp.safetensors"
    assert runner.invoke(app, ["train", "mlp", "-r", str(_recipe(tmp_path / "r.yaml")), "--dataset", "csv",
                               "--data-root", str(data), "-o", str(out)]).exit_code == 0
    holdout = tmp_path / "holdout.csv"
    holdout.write_text("\n".join(data.read_text().splitlines()[:121]) + "\n")  # the header and 120 rows
    default = runner.invoke(app, ["score", str(out), "--data-root", str(holdout), "--no-latency"])
    assert default.exit_code == 0, default.output
    assert "of the data's 120 samples; --split all scores every one" in default.output
    subset = runner.invoke(app, ["score", str(out), "--data-root", str(holdout), "--no-latency", "--samples", "10",
                                 "--report", str(tmp_path / "subset.json")])
    assert subset.exit_code == 0, subset.output
    held = json.loads((tmp_path / "subset.json").read_text())["split_samples"]
    assert f"test split: a stratified 10 of its {held}; the data holds 120" in subset.output
    whole = runner.invoke(app, ["score", str(out), "--data-root", str(holdout), "--no-latency", "--split", "all",
                                "--report", str(tmp_path / "all.json")])
    assert whole.exit_code == 0, whole.output
    report = json.loads((tmp_path / "all.json").read_text())
    assert report["split"] == "all" and report["metrics"]["samples"] == 120 == report["dataset_samples"]
    limited = tmp_path / "limited.yaml"
    limited.write_text("data:\n  train_limit: 30\n")  # every sample still means every sample
    whole = runner.invoke(app, ["score", str(out), "-r", str(limited), "--data-root", str(holdout), "--no-latency",
                                "--split", "all", "--report", str(tmp_path / "limited.json")])
    assert whole.exit_code == 0, whole.output
    assert json.loads((tmp_path / "limited.json").read_text())["metrics"]["samples"] == 120


def test_a_pipe_named_as_the_csv_is_refused_as_not_a_file(runner: CliRunner, tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    result = runner.invoke(app, ["train", "mlp", "-r", str(_recipe(tmp_path / "r.yaml")), "--dataset", "csv",
                                 "--data-root", str(fifo), "-o", str(tmp_path / "m.safetensors")])
    _assert_clean_failure(result, "is not a regular file (a pipe, socket or device)")


def test_an_autoencoder_asked_to_classify_names_the_classifier_to_use(runner: CliRunner, tmp_path: Path) -> None:
    data = _table(tmp_path / "data.csv")
    recipe = _recipe(tmp_path / "r.yaml", "model:\n  task: {kind: classification}\n")
    result = runner.invoke(app, ["train", "a2e", "-r", str(recipe), "--dataset", "csv", "--data-root", str(data),
                                 "-o", str(tmp_path / "m.safetensors")])
    _assert_clean_failure(result, "a2e is built for reconstruction, but model.task.kind is classification; use "
                                  "a2e_classifier")


def _three_class_table(path: Path, rows: int, seed: int, classes: tuple[str, ...] = ("cat", "cow", "dog")) -> Path:
    """Word labels, one class per region of the first feature, so a trained model is mostly right."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(rows, 4))
    labels = np.digitize(values[:, 0], [-0.43, 0.43])
    lines = ["a,b,c,d,Class"] + [",".join([*(f"{v:.5f}" for v in row), classes[y]]) for row, y in zip(values, labels)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_small_holdout_is_scored_whole_and_its_labels_keep_the_models_classes(runner: CliRunner,
                                                                                 tmp_path: Path) -> None:
    """A hold-out file holding some of the classes, or too few rows of one to split, is scored whole with
    `--split all`; its labels are matched to the model's classes by name (positions in the file's own
    sorted labels would shift 'dog' onto 'cow')."""
    out = tmp_path / "mlp.safetensors"
    train = _three_class_table(tmp_path / "train.csv", 600, seed=0)
    assert runner.invoke(app, ["train", "mlp", "-r", str(_recipe(tmp_path / "r.yaml", "  epochs: 8\n")), "--dataset",
                               "csv", "--data-root", str(train), "-o", str(out)]).exit_code == 0
    lines = _three_class_table(tmp_path / "all.csv", 400, seed=1).read_text().splitlines()
    holdout = tmp_path / "holdout.csv"  # cats and dogs only, and just two dogs
    dogs = [line for line in lines[1:] if line.endswith(",dog")][:2]
    holdout.write_text("\n".join([lines[0], *[line for line in lines[1:] if line.endswith(",cat")], *dogs]) + "\n")
    report_path = tmp_path / "holdout.score.json"
    result = runner.invoke(app, ["score", str(out), "--data-root", str(holdout), "--split", "all", "--no-latency",
                                 "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    model = dnnprune.load(out)
    meta = dnnprune.meta_of(model)
    table = np.array([line.split(",") for line in holdout.read_text().splitlines()[1:]])
    x = (table[:, :4].astype(np.float64) - np.array(meta.feature_mean)) / np.array(meta.feature_std)
    x = (x - meta.mean[0]) / meta.std[0]
    with torch.inference_mode():
        predicted = model(torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 1, 4)).argmax(1).numpy()
    expected = (np.array(meta.classes)[predicted] == table[:, 4]).mean()
    report = json.loads(report_path.read_text())
    assert report["metrics"]["samples"] == len(table) and report["metrics"]["top1"] == pytest.approx(expected)
    assert expected > 0.6
    strange = tmp_path / "strange.csv"
    strange.write_text("\n".join([lines[0], *lines[1:20], "0.1,0.2,0.3,0.4,emu"]) + "\n")
    refused = runner.invoke(app, ["score", str(out), "--data-root", str(strange), "--split", "all", "--no-latency"])
    _assert_clean_failure(refused, "holds ['emu'], which the model was not trained on")
