"""Dataset registry and seeded train/val/test splits, adapted to the input a model expects.

Every split is built the same way: the official training set is cut into train and val by a
seeded, class-stratified draw (so val never touches the official test set), and the samples are
converted to the model's `InputSpec` (channels, size, normalisation) on the way out.

Where data lives (first hit wins): `--data-root DIR` (only that, when given), then
`$DNNPRUNE_DATA`, then the standard places (`/usr/share/datasets/<name>` for the Debian packages,
then the cache). The cache is `$DNNPRUNE_CACHE` or `~/.cache/dnnprune/datasets`; it also holds
the uncompressed copies torchvision needs of flat `.gz` IDX files (`idx/<name>-<source hash>/`).
`--download` only fills a gap: it writes to the data root, else `$DNNPRUNE_DATA`, else the cache.

Tabular (csv) samples are float32 tensors of shape (1, 1, F): one "row image" of F features,
so `InputSpec.shape` is (1, 1, F) and flattening gives the F features back.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import shutil
import uuid
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data.dataloader import default_collate

from dnnprune.checkpoint import first_line
from dnnprune.cifar import LAYOUTS, has_files, missing_files, refuse_pickled
from dnnprune.cifar import read_split as read_cifar
from dnnprune.errors import DatasetError
from dnnprune.files import check_regular
from dnnprune.tasks import label_key, whole_number

Kind = Literal["image", "tabular"]


@dataclass(frozen=True)
class InputSpec:
    """What a model expects to be fed; stored in checkpoints so data can be adapted to it."""

    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        shape, mean, std = _spec_fields(self.shape, self.mean, self.std)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def to_dict(self) -> dict[str, list[int] | list[float]]:
        """JSON-ready form for checkpoint metadata."""
        return {"shape": list(self.shape), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        """Inverse of `to_dict`; unknown or missing keys are reported, not ignored."""
        if not isinstance(d, dict) or set(d) != {"shape", "mean", "std"}:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise DatasetError(f"input spec needs exactly the keys shape, mean, std; got {got}")
        return cls(shape=d["shape"], mean=d["mean"], std=d["std"])


def _spec_fields(shape: Any, mean: Any, std: Any) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...]]:
    """Normalise lists to tuples and reject specs no model could use."""
    try:
        shape_t = tuple(int(s) for s in shape)
        mean_t = tuple(float(m) for m in mean)
        std_t = tuple(float(s) for s in std)
    except (TypeError, ValueError):
        raise DatasetError(f"input spec must hold numbers: shape={shape!r} mean={mean!r} std={std!r}") from None
    if len(shape_t) != 3 or min(shape_t) < 1:
        raise DatasetError(f"input shape must be three positive sizes C,H,W; got {shape_t}")
    if len(mean_t) != shape_t[0] or len(std_t) != shape_t[0]:
        raise DatasetError(
            f"input spec has {shape_t[0]} channel(s) but {len(mean_t)} mean(s) and {len(std_t)} std(s);"
            " give one per channel"
        )
    if min(std_t) <= 0:
        raise DatasetError(f"input std must be positive; got {std_t}")
    return shape_t, mean_t, std_t  # type: ignore[return-value]


@dataclass(frozen=True)
class DatasetInfo:
    """Registry entry; `default_spec`/`classes` are None where the files decide (csv, imagefolder)."""

    name: str
    default_spec: InputSpec | None
    classes: list[str] | None
    kind: Kind


Scaling = tuple[tuple[float, ...], tuple[float, ...]]  # a table's per-column (mean, std) from its training split


@dataclass
class Splits:
    """The three splits plus what a model built for them must know."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    spec: InputSpec
    features: list[str] | None = None  # a table's feature columns, in file order
    scaling: Scaling | None = None  # a table's (mean, std) per feature


_IMAGENET = InputSpec((3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
]
_MNIST_CLASSES = [f"{i} - {w}" for i, w in enumerate("zero one two three four five six seven eight nine".split())]
_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle "
    "caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant "
    "flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man "
    "maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor "
    "train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()

DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", InputSpec((1, 28, 28), (0.2860,), (0.3530,)), _FASHION_CLASSES, "image"
    ),
    "mnist": DatasetInfo("mnist", InputSpec((1, 28, 28), (0.1307,), (0.3081,)), _MNIST_CLASSES, "image"),
    "cifar10": DatasetInfo(
        "cifar10", InputSpec((3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), _CIFAR10_CLASSES, "image"
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        InputSpec((3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        _CIFAR100_CLASSES,
        "image",
    ),
    "imagefolder": DatasetInfo("imagefolder", _IMAGENET, None, "image"),
    "csv": DatasetInfo("csv", None, None, "tabular"),
    # Kaggle's credit-card fraud data (ULB): creditcard.csv with Time, V1..V28, Amount and the label Class.
    "creditcard": DatasetInfo("creditcard", None, None, "tabular"),
}

_IDX = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}  # name -> torchvision class (and folder) name
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist"), "mnist": Path("/usr/share/datasets/mnist")}
_INSTALL_HINTS = {"fashion-mnist": "apt-get install dataset-fashion-mnist"}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert("L") uses
_DEFAULT_TEST_FRACTION = 0.15
MAX_FEATURES = 4096  # the largest input dimension a checkpoint may declare
_CREDITCARD = "creditcard.csv"
CREDITCARD_FEATURES = ["Time", *(f"V{i}" for i in range(1, 29)), "Amount"]


def _info(name: str) -> DatasetInfo:
    """Registry lookup that names the choices on a miss."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def default_spec(name: str) -> InputSpec:
    """The input a model trained from scratch on `name` gets."""
    spec = _info(name).default_spec
    if spec is None:
        raise DatasetError(
            f"{name!r} has no fixed input shape; load_splits({name!r}, None, ...) infers it from the file"
        )
    return spec


def per_channel(values: Sequence[float], channels: int, name: str) -> tuple[float, ...]:
    """A normalisation the user gave: one value serves every channel, as numpy broadcasting does;
    otherwise one value per channel."""
    if len(values) == 1:
        return tuple(values) * channels
    if len(values) != channels:
        raise DatasetError(f"{name} takes 1 value (for every channel) or {channels}, one per input channel; "
                           f"got {len(values)}")
    return tuple(values)


def fit_channels(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """A dataset's default normalisation for a model with another channel count: their average per channel."""
    if len(values) == channels:
        return tuple(values)
    return (sum(values) / len(values),) * channels


def tabular_spec(num_features: int) -> InputSpec:
    """Spec for F standardised features laid out as one (1, 1, F) row."""
    return InputSpec((1, 1, num_features), (0.0,), (1.0,))


# ---------------------------------------------------------------- locations


def cache_dir() -> Path:
    """Where bridged and downloaded data go; $DNNPRUNE_CACHE lets CI and tests keep $HOME clean."""
    env = os.environ.get("DNNPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dnnprune" / "datasets"


def _search_bases(name: str, data_root: Path | None) -> list[Path]:
    """Explicit root alone when given (a silent fallback would train on other data), else env + standard."""
    if data_root is not None:
        return [Path(data_root).expanduser()]
    bases = [Path(os.environ["DNNPRUNE_DATA"]).expanduser()] if os.environ.get("DNNPRUNE_DATA") else []
    if name in _SYSTEM_DIRS:
        bases.append(_SYSTEM_DIRS[name])
    bases.append(cache_dir())
    return bases


def _has_idx(d: Path) -> bool:
    return all((d / f).is_file() or (d / f"{f}.gz").is_file() for f in _IDX_FILES)


def _find_in(name: str, base: Path) -> Path | None:
    """The dataset's location under one base, in the layouts people actually have."""
    if name in _IDX:
        cands = [base, base / name, base / _IDX[name] / "raw", base / name / _IDX[name] / "raw"]
        return next((c for c in cands if _has_idx(c)), None)
    if name in LAYOUTS:
        layout = LAYOUTS[name]
        candidates = ([base.parent] if base.name in (layout.folder, layout.pickled_folder) else []) + [base, base / name]
        for candidate in candidates:
            if has_files(candidate / layout.folder, name):
                return candidate
            if (candidate / layout.folder).is_dir():
                missing = missing_files(candidate / layout.folder, name)
                raise DatasetError(f"{candidate / layout.folder} lacks {', '.join(missing)}; unpack the binary version "
                                   f"again ({layout.url}) or add --download")
        pickled = next((c / layout.pickled_folder for c in candidates if (c / layout.pickled_folder).is_dir()), None)
        if pickled is not None:
            raise refuse_pickled(pickled, name)
        return None
    if name == "csv":
        return _find_csv(base)
    if name == "creditcard":
        return next((c for c in (base, base / _CREDITCARD, base / name / _CREDITCARD) if c.is_file()), None)
    return base if base.is_dir() else None


def _find_csv(base: Path) -> Path | None:
    """A CSV path, or the single CSV inside a directory (several is ambiguous, so it is an error)."""
    if base.is_file():
        return base
    if base.exists() and not base.is_dir():
        raise DatasetError(f"{base} is not a regular file (a pipe, socket or device); pass the CSV file itself")
    found = sorted(base.glob("*.csv")) if base.is_dir() else []
    if len(found) > 1:
        raise DatasetError(f"{base} holds several CSV files ({', '.join(p.name for p in found)}); pass the file itself")
    return found[0] if found else None


def resolve_root(name: str, data_root: Path | None) -> Path:
    """Find where `name` lives (a directory; for csv, the file) or say where we looked and how to get it."""
    _info(name)
    if name in ("imagefolder", "csv") and data_root is None:
        raise DatasetError(f"{name} needs a location: pass --data-root {'FILE.csv' if name == 'csv' else 'DIR'}")
    try:
        bases = _search_bases(name, data_root)
        for base in bases:
            found = _find_in(name, base)
            if found is not None:
                return found
    except (OSError, RuntimeError) as exc:  # unreadable folder, name too long, ~user that does not exist
        where = data_root if data_root is not None else os.environ.get("DNNPRUNE_DATA", "the standard places")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc, 120)
        raise DatasetError(f"cannot look for {name} in {str(where)[:200]} ({reason}); pass a readable --data-root "
                           "(or DNNPRUNE_DATA)") from None
    raise DatasetError(f"{name} not found; looked in {', '.join(map(str, bases))}; {_how_to_get(name)}")


def _how_to_get(name: str) -> str:
    if name in ("imagefolder", "csv"):
        return "to fix: pass --data-root with an existing " + ("CSV file" if name == "csv" else "directory")
    if name == "creditcard":
        return (f"to fix: download {_CREDITCARD} (Kaggle: mlg-ulb/creditcardfraud) and pass --data-root with the folder "
                "that holds it (or the file itself)")
    ways = [_INSTALL_HINTS[name]] if name in _INSTALL_HINTS else []
    ways += ["pass --data-root DIR (or set DNNPRUNE_DATA)", "add --download"]
    return "to fix: " + ", or ".join(ways)


# ---------------------------------------------------------------- splitting


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder share of `total` across classes: exact total, each class within one of its quota."""
    quota = counts * (total / max(int(counts.sum()), 1))
    take = np.floor(quota).astype(np.int64)
    short = total - int(take.sum())
    if short > 0:  # ties go to the lower class index, so the result is reproducible
        take[np.argsort(take - quota, kind="stable")[:short]] += 1
    return np.minimum(take, counts)


def _stratified_parts(targets: torch.Tensor, sizes: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Cut indices into len(sizes)+1 parts (the last gets the rest), each keeping the class mix.

    Vectorised numpy: it runs on every load of 60k-sample sets, and torch's threaded sort
    can be 100x slower than numpy's on a busy 2-core machine.
    """
    y = targets.numpy()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).numpy()
    order = perm[np.argsort(y[perm], kind="stable")]  # grouped by class, shuffled within
    counts = np.unique(y, return_counts=True)[1]
    cls_of = np.repeat(np.arange(len(counts)), counts)
    rank = np.arange(len(order)) - (np.cumsum(counts) - counts)[cls_of]  # position within its class
    used = np.zeros_like(counts)
    parts = []
    for size in sizes:
        take = _allocate(counts - used, size)
        parts.append(order[(rank >= used[cls_of]) & (rank < (used + take)[cls_of])])
        used += take
    parts.append(order[rank >= used[cls_of]])
    return [torch.from_numpy(np.sort(p)) for p in parts]


def _check_fraction(what: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise DatasetError(f"{what} must be between 0 and 1 (exclusive); got {value}")


def _carve_val(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Train and val from the official training set; the test set is never touched."""
    _check_fraction("val_fraction", val_fraction)
    n_val = round(len(ds) * val_fraction)
    if not 0 < n_val < len(ds):
        raise DatasetError(f"val_fraction {val_fraction} of {len(ds)} samples leaves an empty train or val split")
    val, train = _stratified_parts(dataset_targets(ds), [n_val], seed)
    return Subset(ds, train.tolist()), Subset(ds, val.tolist())


def _three_way_indices(targets: torch.Tensor, val_fraction: float, test_fraction: float, seed: int) -> list[list[int]]:
    """Seeded stratified [train, val, test] indices when the data has no official test split."""
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    n = len(targets)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    if min(n_test, n_val, n - n_test - n_val) < 1:
        raise DatasetError(
            f"{n} samples cannot be split into train/val/test"
            f" at val_fraction {val_fraction}, test_fraction {test_fraction}"
        )
    test, val, train = _stratified_parts(targets, [n_test, n_val], seed)
    return [train.tolist(), val.tolist(), test.tolist()]


def stratified_subset(ds: Dataset, n: int, seed: int) -> Dataset:
    """A fixed, class-balanced sample (for quick analysis/scoring) that is the same for the same seed."""
    if n < 1 or n > len(ds):
        raise DatasetError(f"asked for {n} samples but the dataset has {len(ds)}; use a number from 1 to {len(ds)}")
    targets = dataset_targets(ds)
    classes = int(targets.unique().numel())
    if n < classes:  # a metric on a sample missing whole classes reads as a real (and alarming) number
        raise DatasetError(f"asked for {n} samples, fewer than the dataset's {classes} classes, so some classes "
                           f"would get none; use at least {classes} (a few thousand give a stable accuracy)")
    return subset(ds, _stratified_parts(targets, [n], seed)[0].tolist())


def subset(ds: Dataset, indices: list[int]) -> Dataset:
    """A subset that stays one level deep, so targets and batched fetches stay cheap."""
    if isinstance(ds, Subset):
        return Subset(ds.dataset, [ds.indices[i] for i in indices])
    return Subset(ds, indices)


def dataset_targets(ds: Dataset) -> torch.Tensor:
    """Labels as int64 without decoding images wherever the dataset keeps them aside."""
    if isinstance(ds, Subset):
        return dataset_targets(ds.dataset).index_select(0, torch.as_tensor(ds.indices, dtype=torch.long))
    if isinstance(ds, ConcatDataset):
        return torch.cat([dataset_targets(d) for d in ds.datasets])
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].long()
    targets = getattr(ds, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.long)  # type: ignore[arg-type]


# ---------------------------------------------------------------- in-memory datasets


class _Adapter:
    """uint8 (B,C0,H0,W0) -> normalised float (B,C,H,W) for the spec; vectorised over the batch."""

    def __init__(self, spec: InputSpec, channels: int) -> None:
        c = spec.shape[0]
        if (channels, c) not in ((1, 1), (3, 3), (1, 3), (3, 1)):
            raise DatasetError(f"cannot adapt {channels}-channel images to a {c}-channel model input")
        self.gray = channels == 3 and c == 1
        self.size = spec.shape[1:]
        self.mean = torch.tensor(spec.mean).view(1, c, 1, 1)
        self.std = torch.tensor(spec.std).view(1, c, 1, 1)
        self.luma = torch.tensor(_LUMA).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255)
        if self.gray:
            x = (x * self.luma).sum(1, keepdim=True)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean).div_(self.std)  # broadcasting also turns 1 channel into 3


class _Batch(list):
    """A batch fetched in one go: still a list of samples, but carries the stacked tensors for `_collate`."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(zip(x.unbind(0), y.tolist()))
        self.x, self.y = x, y


def collate(batch: list[Any]) -> Any:
    """Skip re-stacking batches that `_InMemory` already built."""
    if isinstance(batch, _Batch):
        return [batch.x, batch.y]
    return default_collate(batch)


class _InMemory(Dataset):
    """A whole split in one tensor: a batch is one indexing op, not B PIL round trips (2-core machines)."""

    def __init__(self, samples: torch.Tensor, targets: torch.Tensor, adapt: _Adapter | None = None) -> None:
        self.samples, self.targets, self.adapt = samples, targets.long(), adapt

    def __len__(self) -> int:
        return len(self.targets)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(x) if self.adapt is not None else x

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._prepare(self.samples[i].unsqueeze(0))[0], int(self.targets[i])

    def __getitems__(self, indices: list[int]) -> _Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)  # index_select: x[idx] is ~500x slower on busy cores
        return _Batch(self._prepare(self.samples.index_select(0, idx)), self.targets.index_select(0, idx))


def make_loader(ds: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, workers: int = 0) -> DataLoader:
    """A loader whose shuffle order depends only on `seed`, so runs repeat exactly."""
    if batch_size < 1:
        raise DatasetError(f"batch size must be at least 1; got {batch_size}")
    if workers < 0:
        raise DatasetError(f"workers must be 0 or more; got {workers}")
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=collate,
    )


# ---------------------------------------------------------------- loaders


def _read_error(name: str, where: Path, exc: BaseException, fetch: bool = False) -> DatasetError:
    reason = first_line(exc, 200) if str(exc).strip() else f"{type(exc).__name__}: the files are not in the expected format"
    if fetch:
        return DatasetError(f"cannot download {name} into {where}: {reason}; check the network or fetch it by hand")
    return DatasetError(f"cannot read {name} from {where}: {reason}; replace the files (--download fetches a fresh copy) "
                        "or point --data-root elsewhere")


_READ_ERRORS = (RuntimeError, ValueError, TypeError, OSError, EOFError, KeyError, AssertionError, zlib.error)


def _download_root(data_root: Path | None) -> Path:
    env = os.environ.get("DNNPRUNE_DATA")
    where = Path(data_root) if data_root is not None else Path(env) if env else None
    if where is None:
        return cache_dir()
    try:
        return where.expanduser()
    except RuntimeError:
        raise DatasetError(f"cannot expand {str(where)[:200]}: that user's home is unknown; give a full path") from None


def _locate(name: str, data_root: Path | None, download: bool) -> tuple[Path, bool]:
    """(root, needs_download): found data wins; --download only fills a gap."""
    try:
        return resolve_root(name, data_root), False
    except DatasetError:
        if not download:
            raise
    return _download_root(data_root), True


def _idx_torchvision_root(name: str, found: Path) -> Path:
    """torchvision wants ROOT/<Class>/raw/<uncompressed files>; bridge other layouts via the cache."""
    cls = _IDX[name]
    if found.name == "raw" and found.parent.name == cls and all((found / f).is_file() for f in _IDX_FILES):
        return found.parent.parent
    return _bridge_idx(name, found)


def _bridge_idx(name: str, src: Path) -> Path:
    """Decompress (or copy) once into a cache dir keyed by the source, published by an atomic rename."""
    sources = [src / f if (src / f).is_file() else src / f"{f}.gz" for f in _IDX_FILES]
    stamp = [str(src.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sources]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
    parent = cache_dir() / "idx"
    dest = parent / f"{name}-{key}"
    raw = Path(_IDX[name]) / "raw"
    if _bridged(dest, raw):
        return dest
    tmp = parent / f".{name}-{key}.{uuid.uuid4().hex}.tmp"
    try:
        (tmp / raw).mkdir(parents=True)
    except OSError as exc:
        msg = f"cannot write the dataset cache {parent}: {exc}; set DNNPRUNE_CACHE to a writable dir"
        raise DatasetError(msg) from None
    try:
        for source, target in zip(sources, _IDX_FILES):
            _unpack(source, tmp / raw / target)
        if dest.exists() and not _bridged(dest, raw):  # a broken leftover: move it aside atomically, then drop it
            stale = parent / f".{name}-{key}.{uuid.uuid4().hex}.stale"
            os.replace(dest, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, dest)
    except (OSError, EOFError, zlib.error) as exc:
        if not _bridged(dest, raw):  # a concurrent run may have won the rename
            raise _read_error(name, src, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _bridged(dest: Path, raw: Path) -> bool:
    return all((dest / raw / f).is_file() for f in _IDX_FILES)


def _unpack(source: Path, target: Path) -> None:
    opener: Callable[..., Any] = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rb") as fin, open(target, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def _load_cifar(name: str, spec: InputSpec, data_root: Path | None, download: bool) -> tuple[Dataset, Dataset, list[str]]:
    """CIFAR's binary version read with numpy (`cifar.py`); --download fetches that version."""
    root, fetch = _locate(name, data_root, download)
    if fetch:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(LAYOUTS[name].url, str(root), md5=LAYOUTS[name].md5)
        except _READ_ERRORS as exc:
            raise _read_error(name, root, exc, fetch=True) from None
    adapt = _Adapter(spec, 3)
    (train_x, train_y), (test_x, test_y) = (read_cifar(root, name, split) for split in ("train", "test"))
    return _InMemory(train_x, train_y, adapt), _InMemory(test_x, test_y, adapt), list(DATASETS[name].classes or [])


def _load_torchvision(
    name: str, spec: InputSpec, data_root: Path | None, download: bool
) -> tuple[Dataset, Dataset, list[str]]:
    """The MNIST family through torchvision's reader (CIFAR through `_load_cifar`), held in memory as uint8 NCHW."""
    from torchvision import datasets

    if name in LAYOUTS:
        return _load_cifar(name, spec, data_root, download)
    cls = getattr(datasets, _IDX[name])
    root, fetch = _locate(name, data_root, download)
    tv_root = _idx_torchvision_root(name, root) if name in _IDX and not fetch else root
    try:
        train = cls(str(tv_root), train=True, download=fetch)
        test = cls(str(tv_root), train=False)
    except _READ_ERRORS as exc:
        raise _read_error(name, root, exc, fetch) from None
    for split, dataset in (("training", train), ("test", test)):
        _check_labels(name, root, split, dataset)
    adapt = _Adapter(spec, 1)
    return _in_memory(train, adapt), _in_memory(test, adapt), list(train.classes)


def _check_labels(name: str, root: Path, split: str, dataset: Any) -> None:
    """One label per image, each a valid class: torchvision's readers check neither."""
    images, labels = len(dataset.data), len(dataset.targets)
    if images != labels:
        raise DatasetError(f"{name} in {root}: the {split} split has {images:,} images but {labels:,} labels; the image "
                           "and label files do not belong together (replace them)")
    targets = torch.as_tensor(dataset.targets)
    if labels and (int(targets.min()) < 0 or int(targets.max()) >= len(dataset.classes)):
        raise DatasetError(f"{name} in {root}: the {split} labels run from {int(targets.min())} to {int(targets.max())}, "
                           f"but {name} has {len(dataset.classes)} classes; the label file is corrupt (replace it)")


def _in_memory(ds: Any, adapt: _Adapter) -> _InMemory:
    """torchvision keeps MNIST as an (N,H,W) tensor; it becomes NCHW."""
    images = torch.as_tensor(ds.data).unsqueeze(1)
    return _InMemory(images, torch.as_tensor(ds.targets), adapt)


def _pil_transform(spec: InputSpec) -> Callable[[Any], torch.Tensor]:
    """Per-image path for folders of files: keep aspect (resize + centre crop), then normalise."""
    from torchvision import transforms as T

    c, h, w = spec.shape
    if c not in (1, 3):
        raise DatasetError(f"image folders give 1 or 3 channels; the model wants {c}")
    steps = [T.Grayscale(1)] if c == 1 else []
    steps += [T.Resize(max(h, w)), T.CenterCrop((h, w)), T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    return T.Compose(steps)


def _image_folder(path: Path, spec: InputSpec) -> Dataset:
    from dnnprune.image_folder import ImageFolder

    try:
        return ImageFolder(path, transform=_pil_transform(spec))
    except _READ_ERRORS as exc:
        raise DatasetError(f"cannot read the image folder {path}: {first_line(exc, 200)}; check the folder") from None


def _held_out(root: Path) -> Path | None:
    """root/test (or root/val) where root/train exists beside it: the folder's own test split."""
    if not (root / "train").is_dir():
        return None
    return next((root / s for s in ("test", "val") if (root / s).is_dir()), None)


def image_folder_classes(root: Path) -> list[str]:
    """The class names of an image folder (of its train part, where it has one), without reading images."""
    from dnnprune.image_folder import class_names

    return class_names(root / "train" if _held_out(root) is not None else root)


def _load_imagefolder(root: Path, spec: InputSpec, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """root/train + root/test (or root/val) when present, else a seeded three-way split of root."""
    held_out = _held_out(root)
    if held_out is not None:
        full, test = _image_folder(root / "train", spec), _image_folder(held_out, spec)
        if full.classes != test.classes:
            msg = f"class folders differ between {root / 'train'} and {held_out}: {full.classes} vs {test.classes}"
            raise DatasetError(msg)
        train, val = _carve_val(full, val_fraction, seed)
    else:
        full = _image_folder(root, spec)
        parts = _three_way_indices(dataset_targets(full), val_fraction, test_fraction, seed)
        train, val, test = (Subset(full, p) for p in parts)
    return Splits(train, val, test, list(full.classes), spec)


def _read_csv(path: Path, label_column: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(feature names, float64 features, raw label strings); numpy's C parser, no pandas.

    Every row must have the header's width (numpy would ignore a surplus cell, and a decimal comma
    shifts every column after it), every feature must be finite and every row labelled: each is a
    wrong model, not a slower one, when it passes unnoticed."""
    check_regular(path, "CSV file", error=DatasetError)
    header = _csv_header(path)
    _check_header(path, header, label_column)
    li = header.index(label_column)
    cols = [i for i in range(len(header)) if i != li]
    if not cols:
        raise DatasetError(f"{path} has no feature columns besides {label_column!r}")
    rows = _check_row_widths(path, len(header))
    if rows == 0:
        raise DatasetError(f"{path} has a header but no rows")
    opts = dict(delimiter=",", skiprows=1, quotechar='"', encoding="utf-8-sig", ndmin=2, comments=None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = np.loadtxt(path, usecols=cols, dtype=np.float64, **opts)
            y = np.loadtxt(path, usecols=[li], dtype=str, **opts)[:, 0]
    except ValueError as exc:
        raise DatasetError(f"{path}: every column except {label_column!r} must be numeric: {exc}") from None
    names = [header[i] for i in cols]
    _check_finite(path, x, names)
    _check_labelled(path, y, label_column)
    return names, x, list(y)


def _csv_rows(path: Path) -> Iterator[list[str]]:
    """The file's rows through the csv module, every way it can fail turned into one DatasetError."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield from csv.reader(f)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read {path} as CSV ({first_line(exc, 200)}); save it as UTF-8, comma-separated "
                           "text") from None


def _csv_header(path: Path) -> list[str]:
    return [name.strip() for name in next(_csv_rows(path), [])]


def _check_header(path: Path, header: list[str], label_column: str) -> None:
    shown = ", ".join(repr(name[:40]) for name in header[:20]) + (f", ... ({len(header)} columns)" if len(header) > 20 else "")
    if label_column not in header:
        hint = ("; the file seems to separate values with ';', and dnnprune reads comma-separated files"
                if len(header) == 1 and ";" in header[0] else "; set data.label_column to the column that holds the labels")
        raise DatasetError(f"{path} has no label column {label_column!r}; columns are {shown or '(none)'}{hint}")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DatasetError(f"{path}: column names must be unique; {', '.join(map(repr, repeated[:5]))} appear more "
                           "than once; rename them in the header")


def _check_row_widths(path: Path, width: int) -> int:
    """The number of data rows; a row of another width (a stray or missing comma) is an error naming its line."""
    count = 0
    for line, row in enumerate(_csv_rows(path), start=1):
        if line == 1 or not row:  # the header; blank lines are skipped, as numpy does
            continue
        if len(row) != width:
            raise DatasetError(f"{path}: line {line} has {len(row)} cells but the header has {width}; fix that row "
                               "(a decimal comma or an unquoted comma in a value splits a cell)")
        count += 1
    return count


def _check_finite(path: Path, x: np.ndarray, names: list[str]) -> None:
    """NaN, inf, or a value too large to standardise (1e308 overflows the squares): refuse, naming the first."""
    with np.errstate(all="ignore"):
        bad = ~np.isfinite(x) | ~np.isfinite(x * x)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise DatasetError(f"{path}: data row {row + 1}, column {names[col]!r} holds {float(x[row, col]):g} "
                           f"({int(bad.sum())} such value(s) in all); features must be finite numbers below about "
                           "1e150: fill or drop those rows")


_MISSING_LABELS = frozenset({"", "na", "n/a", "nan", "null", "none"})


def _check_labelled(path: Path, labels: np.ndarray, label_column: str) -> None:
    missing = [i for i, value in enumerate(labels) if value.strip().lower() in _MISSING_LABELS]
    if missing:
        raise DatasetError(f"{path}: {len(missing)} row(s) have no label in {label_column!r} (empty or NA; the first "
                           f"is data row {missing[0] + 1}); label them or drop them")


def _label_names(raw: list[str]) -> tuple[list[str], torch.Tensor]:
    """Class names sorted numerically when they are numbers ('0','1',... so 'Class' 1 stays class 1)."""
    labels = [label_key(v.strip()) for v in raw]
    uniq = set(labels)
    numeric = all(whole_number(u) is not None for u in uniq)
    classes = sorted(uniq, key=whole_number if numeric else None)
    index = {c: i for i, c in enumerate(classes)}
    return classes, torch.tensor([index[v] for v in labels], dtype=torch.long)


def _known_labels(path: Path, raw: list[str], known: tuple[str, ...], label_column: str
                  ) -> tuple[list[str], torch.Tensor]:
    """Labels as positions in a trained model's class list; a label it was not trained on is refused."""
    names, positions = _label_names(raw)
    index = {label_key(name): i for i, name in enumerate(known)}
    strange = [name for name in names if name not in index]
    if strange:
        raise DatasetError(f"{path}: the label column {label_column!r} holds {listed_names(strange)}, which the model was "
                           f"not trained on (its classes: {listed_names(list(known))}); give rows of those classes only")
    mapping = torch.tensor([index[name] for name in names], dtype=torch.long)
    return list(known), mapping[positions]


def listed_names(names: list[str], most: int = 6) -> str:
    """Names for a one-line message: the first few, and how many in all."""
    shown = ", ".join(repr(n) for n in names[:most])
    return f"[{shown}, ...] ({len(names)})" if len(names) > most else f"[{shown}]"


def _check_every_split_has_every_class(path: Path, classes: list[str], y: torch.Tensor, parts: list[list[int]]) -> None:
    """A rare class (frauds) must reach train, val and test, or its metrics there are undefined."""
    for split, indices in zip(("train", "val", "test"), parts):
        present = set(y[indices].tolist())
        missing = [classes[c] for c in range(len(classes)) if c not in present]
        if missing:
            count = int((y == classes.index(missing[0])).sum())
            if count == 0:
                raise DatasetError(f"{path} holds no row of class {missing[0]!r}, one of the model's classes "
                                   f"({listed_names(classes)}); add rows of that class (`score --split all` scores a "
                                   "file that lacks some classes whole)")
            raise DatasetError(f"{path}: class {missing[0]!r} has {count} row(s), too few to put one in the {split} "
                               "split; add rows of that class or use a file with more of them")


def _load_csv(
    path: Path, spec: InputSpec | None, label_column: str, val_fraction: float, test_fraction: float, seed: int,
    scaling: Scaling | None = None, known_classes: tuple[str, ...] | None = None, whole: bool = False,
) -> Splits:
    """Stratified 3-way split, then standardise with train statistics only (no leakage into val/test): this
    file's, or `scaling`, the ones the model was trained with (another file in other units, or with another
    class mix, would otherwise be scaled to look like the training file).

    `known_classes` (a trained model's) maps labels by name, so a file holding some of them keeps each
    label's position; `whole` reads every row into `train` unsplit (a hold-out file scored as a whole
    need not have every class in every split, nor more than one class)."""
    names, x, raw = _read_csv(path, label_column)
    if len(names) > MAX_FEATURES:
        raise DatasetError(f"{path} has {len(names):,} feature columns; a model takes at most {MAX_FEATURES:,} "
                           "inputs: select or reduce the features first")
    classes, y = _label_names(raw) if known_classes is None else _known_labels(path, raw, known_classes, label_column)
    if len(classes) > max(100, len(y) // 4):
        raise DatasetError(f"{path}: the label column {label_column!r} holds {len(classes):,} distinct values in "
                           f"{len(y):,} rows, so it looks like a measurement, not a class; set data.label_column "
                           "to the column of class labels")
    spec = spec or tabular_spec(len(names))
    if spec.shape != (1, 1, len(names)):
        raise DatasetError(f"{path} has {len(names)} feature columns but the model takes {spec.shape[-1]}; give the "
                           "table the model was trained on")
    if len(set(y.tolist())) < 2 and not whole:
        raise DatasetError(f"{path}: the label column {label_column!r} holds one class only ({classes[int(y[0])]!r}); a "
                           "classifier or an anomaly detector needs at least two (check the column or the file)")
    if whole:
        parts = [list(range(len(y))), [], []]
    else:
        parts = _three_way_indices(y, val_fraction, test_fraction, seed)
        _check_every_split_has_every_class(path, classes, y, parts)
    if scaling is not None and len(scaling[0]) == len(names):
        mu, sd = np.asarray(scaling[0], dtype=np.float64), np.asarray(scaling[1], dtype=np.float64)
    else:
        mu, sd = x[parts[0]].mean(0), x[parts[0]].std(0)
        sd[sd == 0] = 1.0
    z = ((x - mu) / sd - spec.mean[0]) / spec.std[0]
    full = _InMemory(torch.from_numpy(z.astype(np.float32)).view(len(y), 1, 1, len(names)), y)
    train, val, test = (Subset(full, p) for p in parts)
    return Splits(train, val, test, classes, spec, features=names,
                  scaling=(tuple(float(v) for v in mu), tuple(float(v) for v in sd)))


def load_splits(
    name: str,
    spec: InputSpec | None = None,
    *,
    data_root: Path | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    label_column: str = "Class",
    path: Path | None = None,
    train_limit: int | None = None,
    test_fraction: float = _DEFAULT_TEST_FRACTION,
    scaling: Scaling | None = None,
    known_classes: tuple[str, ...] | None = None,
    whole: bool = False,
) -> Splits:
    """Seeded train/val/test adapted to `spec` (None: the dataset's default, or inferred for csv).

    `test_fraction` is used only where the data has no official test split (csv, a single folder);
    `known_classes` and `whole` only for tables (see `_load_csv`).
    """
    info = _info(name)
    if spec is None and info.kind == "image":
        spec = default_spec(name)
    if info.kind == "tabular":
        table = resolve_root(name, path or data_root)
        splits = _load_csv(table, spec, label_column, val_fraction, test_fraction, seed, scaling, known_classes, whole)
        if name == "creditcard" and splits.features != CREDITCARD_FEATURES:
            raise DatasetError(f"{table} is not Kaggle's {_CREDITCARD}: its columns are {', '.join(splits.features or [])[:200]}, "
                               f"not Time, V1..V28, Amount; use --dataset csv for other tables")
    elif name == "imagefolder":
        root = resolve_root(name, path or data_root)
        splits = _load_imagefolder(root, spec, val_fraction, test_fraction, seed)  # type: ignore[arg-type]
    else:
        full, test, classes = _load_torchvision(name, spec, data_root, download)  # type: ignore[arg-type]
        train, val = _carve_val(full, val_fraction, seed)
        splits = Splits(train, val, test, classes, spec)  # type: ignore[arg-type]
    if train_limit is not None:
        splits.train = stratified_subset(splits.train, train_limit, seed)
    return splits
