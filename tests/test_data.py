"""Datasets: real Fashion-MNIST where the Debian package is installed, tiny generated files in the
official formats everywhere else (MNIST IDX, CIFAR-10 python batches, image folders, a fraud CSV)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dnnprune import data
from dnnprune.data import (
    DATASETS,
    InputSpec,
    dataset_targets,
    default_spec,
    load_splits,
    make_loader,
    resolve_root,
    stratified_subset,
)
from dnnprune.errors import DatasetError
from tests.fakedata import write_cifar_binary
from tests.fakedata import write_mnist as _write_mnist

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep caches out of $HOME and ignore the developer's own data locations."""
    monkeypatch.setenv("DNNPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DNNPRUNE_DATA", raising=False)
    monkeypatch.setitem(data._SYSTEM_DIRS, "mnist", tmp_path / "no-system-mnist")


@pytest.fixture(scope="module")
def fashion_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One decompression of the real files for the whole module."""
    return str(tmp_path_factory.mktemp("fashion-cache"))


# ---------------------------------------------------------------- file writers (official formats)


def _write_cifar10(root: Path, per_batch: int = 20) -> None:
    write_cifar_binary(root, "cifar10", per_batch)


def _write_pngs(folder: Path, classes: tuple[str, ...], per_class: int, size: tuple[int, int] = (12, 10)) -> None:
    rng = np.random.default_rng(2)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")


def _write_fraud_csv(path: Path, n: int = 200, positives: int = 20) -> None:
    """Kaggle credit-card layout: Time,V1..V28,Amount,"Class" with quoted 0/1 labels."""
    rng = np.random.default_rng(3)
    header = ["Time"] + [f"V{i}" for i in range(1, 29)] + ["Amount", "Class"]
    rows = [",".join(f'"{h}"' for h in header)]
    for i in range(n):
        feats = [float(i)] + list(rng.normal(size=28)) + [float(rng.uniform(0, 500))]
        rows.append(",".join(f"{v:.6f}" for v in feats) + (',"1"' if i % (n // positives) == 0 else ',"0"'))
    path.write_text("\n".join(rows) + "\n")


# ---------------------------------------------------------------- real Fashion-MNIST


@needs_fashion
def test_fashion_mnist_official_sizes_and_seeded_split(fashion_cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DNNPRUNE_CACHE", fashion_cache)
    s = load_splits("fashion-mnist", default_spec("fashion-mnist"), val_fraction=0.1, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert s.classes[0] == "T-shirt/top" and len(s.classes) == 10
    assert set(s.train.indices).isdisjoint(s.val.indices)
    assert torch.bincount(dataset_targets(s.val)).tolist() == [600] * 10  # stratified
    again = load_splits("fashion-mnist", None, seed=0)
    other = load_splits("fashion-mnist", None, seed=1)
    assert again.val.indices == s.val.indices
    assert other.val.indices != s.val.indices
    x, y = s.test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)


@needs_fashion
@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 32, 32)])
def test_fashion_mnist_adapts_to_model_input(
    shape: tuple[int, int, int], fashion_cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DNNPRUNE_CACHE", fashion_cache)
    c = shape[0]
    spec = InputSpec(shape, (0.5,) * c, (0.25,) * c)
    s = load_splits("fashion-mnist", spec, train_limit=500)
    assert len(s.train) == 500
    xb, yb = next(iter(make_loader(s.train, 64)))
    assert xb.shape == (64, *shape) and yb.shape == (64,)
    if c == 3:
        assert torch.equal(xb[:, 0], xb[:, 2])  # gray repeated, not invented colour
    x, _ = s.train[0]
    assert torch.allclose(x, xb[0])  # per-sample and batched paths agree


# ---------------------------------------------------------------- MNIST (generated IDX files)


def test_mnist_torchvision_layout(tmp_path: Path) -> None:
    images = _write_mnist(tmp_path / "data" / "MNIST" / "raw")
    s = load_splits("mnist", None, data_root=tmp_path / "data", val_fraction=0.2, seed=3)
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 20)
    assert torch.bincount(dataset_targets(s.val), minlength=10).tolist() == [1] * 10
    x, y = s.train.dataset[7]
    expected = (torch.from_numpy(images[7]).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(x[0], expected, atol=1e-5) and y == 7
    assert not (tmp_path / "cache").exists()  # the official layout needs no bridge


def test_mnist_flat_gz_layout_is_bridged_once(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "flat", gz=True)
    a = load_splits("mnist", InputSpec((3, 32, 32), (0.1,) * 3, (0.3,) * 3), data_root=tmp_path / "flat")
    bridged = list((tmp_path / "cache" / "idx").iterdir())
    assert len(bridged) == 1 and (bridged[0] / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    stamp = bridged[0].stat().st_mtime_ns
    b = load_splits("mnist", InputSpec((3, 32, 32), (0.1,) * 3, (0.3,) * 3), data_root=tmp_path / "flat")
    assert list((tmp_path / "cache" / "idx").iterdir()) == bridged and bridged[0].stat().st_mtime_ns == stamp
    assert torch.equal(a.train[0][0], b.train[0][0]) and a.train[0][0].shape == (3, 32, 32)


def test_env_data_root_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_mnist(tmp_path / "shared" / "mnist")
    monkeypatch.setenv("DNNPRUNE_DATA", str(tmp_path / "shared"))
    assert resolve_root("mnist", None) == tmp_path / "shared" / "mnist"


def test_missing_dataset_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        load_splits("mnist", None)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "cache") in msg and str(tmp_path / "no-system-mnist") in msg
    assert "--data-root" in msg and "--download" in msg
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        resolve_root("fashion-mnist", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        resolve_root("fashion-mnist", tmp_path / "nowhere")


def test_download_fills_the_cache_and_is_found_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network here: stand in for torchvision's download with one that writes the official files."""
    from torchvision.datasets import MNIST

    calls = []

    def fake_download(self: MNIST) -> None:
        calls.append(self.raw_folder)
        _write_mnist(Path(self.raw_folder))

    monkeypatch.setattr(MNIST, "download", fake_download)
    s = load_splits("mnist", None, download=True)
    assert len(s.test) == 20 and calls == [str(tmp_path / "cache" / "MNIST" / "raw")]
    assert resolve_root("mnist", None) == tmp_path / "cache" / "MNIST" / "raw"
    load_splits("mnist", None, download=True)
    assert len(calls) == 1  # found data wins; --download only fills a gap


def test_failed_download_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import MNIST

    def offline(self: MNIST) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(MNIST, "download", offline)
    with pytest.raises(DatasetError, match="cannot download mnist"):
        load_splits("mnist", None, download=True)


def test_corrupt_idx_file_is_a_dataset_error(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist(raw)
    (raw / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(DatasetError, match="cannot read mnist"):
        load_splits("mnist", None, data_root=tmp_path)


def test_truncated_gz_leaves_no_half_written_cache(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "flat", gz=True)
    blob = (tmp_path / "flat" / "train-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "flat" / "train-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="cannot read mnist"):
        load_splits("mnist", None, data_root=tmp_path / "flat")
    assert list((tmp_path / "cache" / "idx").iterdir()) == []


# ---------------------------------------------------------------- CIFAR-10 (generated batches)


def test_cifar10_official_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_cifar10(tmp_path)
    s = load_splits("cifar10", None, data_root=tmp_path, val_fraction=0.1)
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 20)
    assert s.classes == DATASETS["cifar10"].classes
    xb, yb = next(iter(make_loader(s.test, 8)))
    assert xb.shape == (8, 3, 32, 32) and yb.tolist() == list(range(8))
    gray = load_splits("cifar10", InputSpec((1, 24, 24), (0.5,), (0.5,)), data_root=tmp_path / "cifar-10-batches-bin")
    assert gray.test[0][0].shape == (1, 24, 24)


class _Trap:
    """Unpickling this creates a file: the proof that a reader unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifars_python_version_is_refused_without_unpickling_it(tmp_path: Path, name: str, folder: str) -> None:
    marker = tmp_path / "unpickled"
    (tmp_path / folder).mkdir()
    for file in ("data_batch_1", "test_batch", "train", "test", "batches.meta", "meta"):
        (tmp_path / folder / file).write_bytes(pickle.dumps(_Trap(marker)))
    for root in (tmp_path, tmp_path / folder):
        with pytest.raises(DatasetError, match="python version, a set of pickles, which dnnprune never loads"):
            load_splits(name, None, data_root=root)
    assert not marker.exists()


def test_cifar100_binary_reads_fine_labels_and_planes_exactly(tmp_path: Path) -> None:
    write_cifar_binary(tmp_path, "cifar100", per_file=30)
    s = load_splits("cifar100", InputSpec((3, 32, 32), (0.0,) * 3, (1.0,) * 3), data_root=tmp_path, val_fraction=0.2)
    x, y = next(iter(make_loader(s.test, 30)))
    assert y.tolist() == list(range(30)) and s.classes == DATASETS["cifar100"].classes
    assert torch.allclose(x[:, 0], (torch.arange(30, dtype=torch.float32) / 255.0)[:, None, None].expand(30, 32, 32))


def test_a_truncated_cifar_file_is_one_error(tmp_path: Path) -> None:
    folder = write_cifar_binary(tmp_path, "cifar10")
    (folder / "test_batch.bin").write_bytes((folder / "test_batch.bin").read_bytes()[:-100])
    with pytest.raises(DatasetError, match="not whole 3,073-byte CIFAR records"):
        load_splits("cifar10", None, data_root=tmp_path)


# ---------------------------------------------------------------- ImageFolder (generated PNGs)


def test_imagefolder_single_folder_three_way(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "imgs", ("cat", "dog"), per_class=10)
    spec = InputSpec((1, 8, 8), (0.5,), (0.5,))
    s = load_splits("imagefolder", spec, data_root=tmp_path / "imgs", val_fraction=0.2, test_fraction=0.2)
    assert (len(s.train), len(s.val), len(s.test)) == (12, 4, 4) and s.classes == ["cat", "dog"]
    assert torch.bincount(dataset_targets(s.test)).tolist() == [2, 2]
    assert s.train[0][0].shape == (1, 8, 8)
    every = set(s.train.indices) | set(s.val.indices) | set(s.test.indices)
    assert len(every) == 20


def test_imagefolder_train_test_subfolders(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "train", ("a", "b", "c"), per_class=4)
    _write_pngs(tmp_path / "val", ("a", "b", "c"), per_class=2)
    spec = InputSpec((3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    s = load_splits("imagefolder", spec, data_root=tmp_path, val_fraction=0.25)
    assert (len(s.train), len(s.val), len(s.test)) == (9, 3, 6)
    xb, _ = next(iter(make_loader(s.test, 6)))
    assert xb.shape == (6, 3, 16, 16)


# ---------------------------------------------------------------- CSV (credit-card layout)


def test_csv_fraud_layout_stratified_and_standardised(tmp_path: Path) -> None:
    _write_fraud_csv(tmp_path / "creditcard.csv")
    s = load_splits("csv", None, data_root=tmp_path, val_fraction=0.15, test_fraction=0.15)
    assert s.features is not None and len(s.features) == 30 and s.spec.shape == (1, 1, 30) and s.classes == ["0", "1"]
    assert (len(s.train), len(s.val), len(s.test)) == (140, 30, 30)
    assert [int(dataset_targets(d).sum()) for d in (s.train, s.val, s.test)] == [14, 3, 3]
    xb, _ = next(iter(make_loader(s.train, 200)))
    assert xb.shape == (140, 1, 1, 30) and xb.dtype == torch.float32
    flat = xb.flatten(1)
    assert torch.allclose(flat.mean(0), torch.zeros(30), atol=1e-4)
    assert torch.allclose(flat.std(0, unbiased=False), torch.ones(30), atol=1e-3)
    again = load_splits("csv", None, path=tmp_path / "creditcard.csv", val_fraction=0.15, test_fraction=0.15)
    assert again.test.indices == s.test.indices


def test_csv_errors_name_the_problem(tmp_path: Path) -> None:
    _write_fraud_csv(tmp_path / "creditcard.csv")
    with pytest.raises(DatasetError, match="no label column 'Label'"):
        load_splits("csv", None, path=tmp_path / "creditcard.csv", label_column="Label")
    with pytest.raises(DatasetError, match="30 feature columns"):
        load_splits("csv", InputSpec((1, 1, 4), (0.0,), (1.0,)), path=tmp_path / "creditcard.csv")
    (tmp_path / "bad.csv").write_text("a,b,Class\n1,x,0\n")
    with pytest.raises(DatasetError, match="must be numeric"):
        load_splits("csv", None, path=tmp_path / "bad.csv")
    with pytest.raises(DatasetError, match="several CSV files"):
        load_splits("csv", None, data_root=tmp_path)
    with pytest.raises(DatasetError, match="--data-root"):
        load_splits("csv", None)


# ---------------------------------------------------------------- helpers


def test_stratified_subset_balance_and_bounds(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "MNIST" / "raw", n_train=100)
    s = load_splits("mnist", None, data_root=tmp_path, val_fraction=0.1)
    sub = stratified_subset(s.train, 30, seed=5)
    assert torch.bincount(dataset_targets(sub), minlength=10).tolist() == [3] * 10
    assert sub.dataset is s.train.dataset  # flattened, not Subset of Subset
    assert stratified_subset(s.train, 30, seed=5).indices == sub.indices
    with pytest.raises(DatasetError, match=r"asked for 91 .* has 90"):
        stratified_subset(s.train, 91, seed=0)
    with pytest.raises(DatasetError, match=r"asked for 9 samples, fewer than the dataset's 10 classes.*at least 10"):
        stratified_subset(s.train, 9, seed=0)
    assert torch.bincount(dataset_targets(stratified_subset(s.train, 10, seed=0)), minlength=10).tolist() == [1] * 10


def test_loader_shuffle_is_seeded(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "MNIST" / "raw")
    s = load_splits("mnist", None, data_root=tmp_path)
    order = lambda seed: torch.cat([y for _, y in make_loader(s.train, 7, shuffle=True, seed=seed)])  # noqa: E731
    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))
    plain = torch.utils.data.DataLoader(s.train, batch_size=7)  # stock collate still works
    assert torch.equal(next(iter(plain))[0], next(iter(make_loader(s.train, 7)))[0])


def test_input_spec_round_trip_and_validation() -> None:
    spec = default_spec("cifar10")
    assert InputSpec.from_dict(spec.to_dict()) == spec
    assert InputSpec([1, 28, 28], [0.5], [0.5]).shape == (1, 28, 28)
    with pytest.raises(DatasetError, match="one per channel"):
        InputSpec((3, 32, 32), (0.5,), (0.5,))
    with pytest.raises(DatasetError, match="exactly the keys"):
        InputSpec.from_dict({"shape": [1, 2, 3]})
    with pytest.raises(DatasetError, match="unknown dataset"):
        default_spec("svhn")
    assert len(DATASETS["cifar100"].classes) == 100
    assert set(DATASETS) == {"fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "csv", "creditcard"}
