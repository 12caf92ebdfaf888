"""CIFAR-10 and CIFAR-100 from their binary versions, read with numpy: never a pickle.

The "python version" (`cifar-10-batches-py`, torchvision's download) is a set of pickles, and unpickling
runs whatever the file says; dnnprune never unpickles, so it reads the binary version that the same
site publishes (https://www.cs.toronto.edu/~kriz/cifar.html): fixed-size records of label byte(s) then
3,072 pixel bytes (the red, green and blue 32x32 planes), 10,000 records to a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dnnprune.errors import DatasetError

_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class Layout:
    folder: str  # what the archive unpacks to
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_bytes: int  # CIFAR-100 stores the coarse label, then the fine one
    classes: int
    url: str
    md5: str  # the archive's, as the CIFAR page lists it: a download that differs is refused before extracting
    pickled_folder: str  # the python version, refused


LAYOUTS = {
    "cifar10": Layout("cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",), 1, 10,
                      "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530",
                      "cifar-10-batches-py"),
    "cifar100": Layout("cifar-100-binary", ("train.bin",), ("test.bin",), 2, 100,
                       "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8",
                       "cifar-100-python"),
}


def read_split(root: Path, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images N x 3 x 32 x 32, int64 labels) of one split, from `root/<layout folder>`."""
    layout = LAYOUTS[name]
    parts = [_read_file(root / layout.folder / file, layout) for file in (layout.train if split == "train" else layout.test)]
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


def _read_file(path: Path, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    record = layout.label_bytes + _PIXELS
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"cannot read {path} ({exc.strerror or exc}); check the file or download it again") from None
    if raw.size == 0 or raw.size % record:
        raise DatasetError(f"{path} holds {raw.size:,} bytes, not whole {record:,}-byte CIFAR records; it is truncated "
                           "or not the binary version (download it again)")
    rows = raw.reshape(-1, record)
    labels = torch.from_numpy(rows[:, layout.label_bytes - 1].astype(np.int64))  # the fine label, for CIFAR-100
    if int(labels.max()) >= layout.classes:
        raise DatasetError(f"{path} has label {int(labels.max())} but CIFAR has {layout.classes} classes; the file is "
                           "corrupt (download it again)")
    images = torch.from_numpy(rows[:, layout.label_bytes:].copy()).view(-1, 3, 32, 32)
    return images, labels


def has_files(folder: Path, name: str) -> bool:
    return folder.is_dir() and not missing_files(folder, name)


def missing_files(folder: Path, name: str) -> list[str]:
    layout = LAYOUTS[name]
    return [file for file in layout.train + layout.test if not (folder / file).is_file()]


def refuse_pickled(folder: Path, name: str) -> DatasetError:
    layout = LAYOUTS[name]
    return DatasetError(f"{folder} is CIFAR's python version, a set of pickles, which dnnprune never loads; get the "
                        f"binary version ({layout.url}, it unpacks to {layout.folder}/) and pass the folder that holds "
                        "it, or add --download")
