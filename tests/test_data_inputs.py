"""A user's own data files, wrong in the ways real files are wrong: each is refused in one DatasetError that
names the file and the fix, before a model is trained or scored on shuffled, mislabelled or missing data."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dnnprune.checkpoint import CheckpointMeta
from dnnprune.data import InputSpec, image_folder_classes, load_splits, make_loader
from dnnprune.errors import DatasetError
from dnnprune.image_folder import read_image
from dnnprune.loaders import check_fits
from dnnprune.tasks import TaskSpec
from tests.fakedata import idx_bytes, write_creditcard, write_mnist

_GOOD = "a,b,c,Class\n" + "".join(f"{i % 7},{(i * 3) % 5},{i % 2},{i % 2}\n" for i in range(60))


def _csv(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, fragment", [
    ("a,a,Class\n1,2,0\n3,4,1\n", "column names must be unique; 'a' appear"),
    (_GOOD.replace("1,3,1,1\n", "1,3,1,1,9\n", 1), "has 5 cells but the header has 4"),
    (_GOOD.replace("1,3,1,1\n", "1,5,3,1,1\n", 1), "has 5 cells but the header has 4"),
    (_GOOD.replace("1,3,1,1\n", "1,nan,1,1\n", 1), "column 'b' holds nan"),
    (_GOOD.replace("1,3,1,1\n", "1,inf,1,1\n", 1), "column 'b' holds inf"),
    (_GOOD.replace("1,3,1,1\n", "1e308,3,1,1\n", 1), "column 'a' holds 1e+308"),
    (_GOOD.replace("1,3,1,1\n", "1,3,1,\n", 1), "1 row(s) have no label in 'Class'"),
    (_GOOD.replace("1,3,1,1\n", "1,3,1,NA\n", 1), "1 row(s) have no label in 'Class'"),
    ("a;b;Class\n1;2;0\n", "separate values with ';'"),
    ("x" * 200_000 + ",Class\n1,0\n", "cannot read"),
    ("a,b,Class\n" + "".join(f"{i},{i},{i * 0.37:.3f}\n" for i in range(400)), "looks like a measurement"),
    ("a,b,Class\n# a comment\n1,2,0\n", "line 2 has 1 cells"),
])
def test_a_malformed_table_is_refused_with_its_row_or_column(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(DatasetError) as caught:
        load_splits("csv", None, path=_csv(tmp_path, text))
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_a_table_wider_than_a_model_input_names_the_limit(tmp_path: Path) -> None:
    header = ",".join(f"f{i}" for i in range(5000)) + ",Class\n"
    rows = "".join(",".join(["0.5"] * 5000) + f",{i % 2}\n" for i in range(40))
    with pytest.raises(DatasetError, match="5,000 feature columns; a model takes at most 4,096"):
        load_splits("csv", None, path=_csv(tmp_path, header + rows))


def test_a_clean_table_loads_without_a_warning_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = load_splits("csv", None, path=_csv(tmp_path, " a , b ,c, Class\r\n" + _GOOD.split("\n", 1)[1] + "\n\n"))
    assert splits.features == ["a", "b", "c"] and splits.classes == ["0", "1"]


def test_creditcard_must_have_kaggles_columns(tmp_path: Path) -> None:
    path = write_creditcard(tmp_path / "creditcard.csv", rows=400)
    assert load_splits("creditcard", None, data_root=tmp_path).features[-1] == "Amount"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(",".join(line.split(",")[:-2] + line.split(",")[-1:]) for line in lines) + "\n")
    with pytest.raises(DatasetError, match="is not Kaggle's creditcard.csv.*use --dataset csv"):
        load_splits("creditcard", None, data_root=tmp_path)


# ----------------------------------------------------------------------------- the data must fit the model


def _tabular_meta(features: list[str], classes: list[str], **task: object) -> CheckpointMeta:
    return CheckpointMeta(arch="mlp", arch_args={"num_classes": len(classes)}, input_shape=(1, 1, len(features)),
                          dataset="csv", classes=classes, features=features, task=TaskSpec(**task))


def test_a_table_whose_columns_moved_is_refused(tmp_path: Path) -> None:
    reordered = "c,b,a,Class\n" + "".join(",".join(reversed(row.split(",")[:3])) + "," + row.split(",")[3] + "\n"
                                          for row in _GOOD.splitlines()[1:])
    splits = load_splits("csv", None, path=_csv(tmp_path, reordered))
    with pytest.raises(DatasetError, match="column 1 is 'c', the model's is 'a'"):
        check_fits(_tabular_meta(["a", "b", "c"], ["0", "1"]), splits, "csv")
    check_fits(_tabular_meta(["c", "b", "a"], ["0", "1"]), splits, "csv")


def test_other_class_names_too_many_classes_and_no_anomaly_left_are_refused(tmp_path: Path) -> None:
    splits = load_splits("csv", None, path=_csv(tmp_path, _GOOD))
    with pytest.raises(DatasetError, match=r"has classes \['0', '1'\] but the model was trained on \['3', '7'\]"):
        check_fits(_tabular_meta(["a", "b", "c"], ["3", "7"]), splits, "csv")
    narrow = CheckpointMeta(arch="mlp", arch_args={"num_classes": 1}, input_shape=(1, 1, 3), dataset="other")
    with pytest.raises(DatasetError, match="the model has 1 outputs but csv has 2 classes"):
        check_fits(narrow, splits, "csv")
    with pytest.raises(DatasetError, match=r"normal_classes \[0, 1\] covers every class"):
        check_fits(_tabular_meta(["a", "b", "c"], ["0", "1"], kind="reconstruction", normal_classes=[0, 1]), splits, "csv")


# ----------------------------------------------------------------------------- IDX files


def _rewrite(folder: Path, name: str, array: np.ndarray) -> None:
    (folder / name).write_bytes(idx_bytes(array))


@pytest.mark.parametrize("labels, fragment", [
    (np.arange(40, dtype=np.uint8) % 10, "has 50 images but 40 labels"),
    (np.arange(60, dtype=np.uint8) % 10, "has 50 images but 60 labels"),
    (np.full(50, 11, dtype=np.uint8), "labels run from 11 to 11, but mnist has 10 classes"),
])
def test_idx_labels_must_match_their_images(tmp_path: Path, labels: np.ndarray, fragment: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DNNPRUNE_CACHE", str(tmp_path / "cache"))
    write_mnist(tmp_path / "m")
    _rewrite(tmp_path / "m", "train-labels-idx1-ubyte", labels)
    with pytest.raises(DatasetError, match=fragment):
        load_splits("mnist", None, data_root=tmp_path / "m")


def test_a_corrupt_deflate_stream_is_a_dataset_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DNNPRUNE_CACHE", str(tmp_path / "cache"))
    write_mnist(tmp_path / "m", gz=True)
    target = tmp_path / "m" / "train-images-idx3-ubyte.gz"
    blob = bytearray(target.read_bytes())
    blob[10:12] = b"\xff\xff"  # the first deflate block header: "invalid block type"
    target.write_bytes(bytes(blob))
    with pytest.raises(DatasetError, match="cannot read mnist"):
        load_splits("mnist", None, data_root=tmp_path / "m")


@pytest.mark.parametrize("root", ["a" * 5000, "~no_such_user_dnnprune/x"])
def test_a_data_root_the_system_cannot_look_in_is_one_error(root: str) -> None:
    with pytest.raises(DatasetError, match="cannot look for mnist in"):
        load_splits("mnist", None, data_root=Path(root))


# ----------------------------------------------------------------------------- image folders


def _pngs(folder: Path, per_class: int = 6, mode: str = "RGB") -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).convert(mode).save(folder / f"{i}.png")


_SPEC = InputSpec((3, 8, 8), (0.5,) * 3, (0.25,) * 3)


def test_an_image_folder_keeps_every_class_skips_hidden_folders_links_back_and_fifos(tmp_path: Path) -> None:
    for name in ("cat", "dog", "fox", ".ipynb_checkpoints"):
        _pngs(tmp_path / name)
    (tmp_path / "cat" / "up").symlink_to("..")  # would repeat every class under cat
    os.mkfifo(tmp_path / "dog" / "pipe.png")  # would block the reader for ever
    assert image_folder_classes(tmp_path) == ["cat", "dog", "fox"]
    splits = load_splits("imagefolder", _SPEC, data_root=tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert splits.classes == ["cat", "dog", "fox"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 18


def test_an_image_folder_of_one_class_is_refused(tmp_path: Path) -> None:
    _pngs(tmp_path / "cat")
    _pngs(tmp_path / ".hidden")
    with pytest.raises(DatasetError, match="at least two \\(found only 'cat'\\)"):
        load_splits("imagefolder", _SPEC, data_root=tmp_path)


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_an_unreadable_image_is_named_when_its_batch_is_read(tmp_path: Path, content: bytes | None) -> None:
    _pngs(tmp_path / "cat")
    _pngs(tmp_path / "dog")
    bad = tmp_path / "dog" / "0.png"
    if content is None:  # a truncated file
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        bad.write_bytes(content)
    splits = load_splits("imagefolder", _SPEC, data_root=tmp_path, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(DatasetError, match=f"cannot read the image {bad}"):
        for split in (splits.train, splits.val, splits.test):
            list(make_loader(split, 4))


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = np.asarray(read_image(str(tmp_path / "deep.png")))[..., 0]
    assert len(np.unique(pixels)) > 200 and pixels.max() == 255 and pixels.min() == 0
    assert torch.tensor(pixels).float().mean().item() == pytest.approx(127.5, abs=2)


def test_a_cifar_data_root_is_never_left_for_its_parent(tmp_path: Path) -> None:
    from tests.fakedata import write_cifar_binary

    folder = write_cifar_binary(tmp_path, "cifar10")
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "nonexistent", tmp_path / "empty"):
        with pytest.raises(DatasetError, match="cifar10 not found"):
            load_splits("cifar10", None, data_root=root)
    assert len(load_splits("cifar10", None, data_root=folder).test) == 20  # the layout folder itself: its parent


def test_a_class_folder_linking_back_to_the_data_is_refused(tmp_path: Path) -> None:
    _pngs(tmp_path / "data" / "cat")
    (tmp_path / "data" / "dog").symlink_to("..")
    with pytest.raises(DatasetError, match="holds the data folder itself; remove the link"):
        image_folder_classes(tmp_path / "data")


def test_a_table_is_scaled_with_the_statistics_it_was_trained_with(tmp_path: Path) -> None:
    """Another file in other units (or with another class mix) must not be standardised to look like the first."""
    first = load_splits("csv", None, path=_csv(tmp_path, _GOOD))
    assert first.scaling is not None
    rows = [line.split(",") for line in _GOOD.splitlines()[1:]]
    scaled = "a,b,c,Class\n" + "".join(f"{float(a) * 1000 + 1000},{b},{c},{y}\n" for a, b, c, y in rows)
    second = load_splits("csv", None, path=_csv(tmp_path, scaled, "kilo.csv"), scaling=first.scaling)
    x, _ = next(iter(make_loader(second.test, 1000)))
    mean, std = first.scaling[0][0], first.scaling[1][0]
    raw = torch.tensor([float(rows[i][0]) * 1000 + 1000 for i in second.test.indices])
    assert torch.allclose(x[:, 0, 0, 0], ((raw - mean) / std).float(), rtol=1e-5)
    assert float(x[:, 0, 0, 0].abs().min()) > 100  # scaled as the model knows the column: far out, not re-centred


def test_a_cifar_folder_missing_a_file_names_it(tmp_path: Path) -> None:
    from tests.fakedata import write_cifar_binary

    folder = write_cifar_binary(tmp_path, "cifar10")
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DatasetError, match="lacks data_batch_3.bin"):
        load_splits("cifar10", None, data_root=tmp_path)


def test_a_photo_is_read_upright(tmp_path: Path) -> None:
    image = Image.new("RGB", (60, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to view
    image.save(tmp_path / "portrait.jpg", exif=exif)
    assert read_image(str(tmp_path / "portrait.jpg")).size == (30, 60)


def test_a_cifar_download_that_is_not_the_published_archive_is_refused_before_it_is_unpacked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tampered or truncated archive (here one whose member escapes the folder) must not be extracted: its
    MD5 is checked against the one the CIFAR page lists."""
    import io
    import tarfile

    import torchvision.datasets.utils as tv_utils

    def serve(url: str, path: str) -> None:
        payload = b"x" * 64
        with tarfile.open(path, "w:gz") as archive:
            member = tarfile.TarInfo("../escaped.bin")
            member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))

    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tv_utils, "_urlretrieve", serve)
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match=r"cannot download cifar10 into .*(corrupt|not found)"):
        load_splits("cifar10", None, data_root=root, download=True)
    assert not (tmp_path / "escaped.bin").exists() and not (root / "cifar-10-batches-bin").exists()


def _labelled(labels: list[str]) -> str:
    return "a,b,Class\n" + "".join(f"{i % 7},{(i * 3) % 5},{labels[i % len(labels)]}\n" for i in range(60))


def test_table_labels_match_the_models_classes_by_number_however_written(tmp_path: Path) -> None:
    """'0.50' in a hold-out file is the model's class '0.5', as '01' is '1'; a file's labels were once refused
    as unseen for a decimal spelled another way."""
    trained = load_splits("csv", None, path=_csv(tmp_path, _labelled(["0.5", "1.5", "2"])))
    assert trained.classes == ["0.5", "1.5", "2"]
    holdout = load_splits("csv", None, path=_csv(tmp_path, _labelled(["2.0", "0.50", "1.50"]), "h.csv"),
                          known_classes=tuple(trained.classes), whole=True)
    assert holdout.classes == ["0.5", "1.5", "2"]
    assert [holdout.train[i][1] for i in range(3)] == [2, 0, 1]


def test_only_plain_ascii_numbers_are_read_as_numbers(tmp_path: Path) -> None:
    """float() reads '1_0' as 10 and Arabic-Indic digits as digits; isdigit() takes '²', which int() refuses."""
    splits = load_splits("csv", None, path=_csv(tmp_path, _labelled(["1_0", "10", "\u0661", "1", "\u00b2"])))
    assert splits.classes == sorted(["1_0", "10", "\u0661", "1", "\u00b2"])


def test_a_holdout_split_three_ways_that_lacks_a_class_names_it_and_split_all(tmp_path: Path) -> None:
    text = _labelled(["0", "1"])
    with pytest.raises(DatasetError, match=r"holds no row of class .2., one of the model.s classes .*add rows of that class .*score --split all"):
        load_splits("csv", None, path=_csv(tmp_path, text), known_classes=("0", "1", "2"))


def test_normal_classes_name_a_decimal_label_however_written(tmp_path: Path) -> None:
    from dnnprune.tasks import normal_positions

    splits = load_splits("csv", None, path=_csv(tmp_path, _labelled(["0.5", "1.5"])))
    assert normal_positions(["0.50"], splits.classes) == normal_positions(["0.5"], splits.classes) == (0,)
    assert normal_positions([" 1.50"], splits.classes) == (1,)
    with pytest.raises(DatasetError, match="is not one of the data's labels"):
        normal_positions(["1_5"], splits.classes)


def test_a_label_with_a_huge_exponent_keeps_its_spelling() -> None:
    """Decimal.normalize() overflowed on 1e999999999 (a traceback from train); 1e-1000030 rounded to '0'."""
    from dnnprune.tasks import label_key

    assert label_key("1e999999999") == "1e999999999" and label_key("1e-1000030") == "1e-1000030"
    assert label_key("1e-7") == label_key("0.0000001") == "1E-7" and label_key("1E3") == "1000"
