"""A folder of class folders of images, read the way a user's own photos need it.

torchvision's ImageFolder takes every folder as a class (`.ipynb_checkpoints` too), follows symlinked
folders (a link to `..` repeats the whole tree under one class), opens a FIFO named `x.png` and waits
for ever, clips 16-bit images to black and white, and fails on an unreadable file only at the batch
that reaches it, with PIL's traceback. Here hidden folders are skipped, links are followed only at the
class level, only regular files are read, 16-bit images are scaled to 8 bits, and a file that cannot
be decoded is a DatasetError naming it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps
from torchvision.datasets import DatasetFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from dnnprune.errors import DatasetError

_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def class_names(root: Path) -> list[str]:
    """The visible sub-folders of `root`, sorted: the class names, without reading an image."""
    try:
        entries = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    except OSError as exc:
        raise DatasetError(f"cannot list {root} ({exc.strerror or exc}); check that it is a readable folder") from None
    top = root.resolve()
    for name in entries:
        target = (root / name).resolve()
        if top == target or top.is_relative_to(target):
            raise DatasetError(f"class folder {root / name} links to {target}, which holds the data folder itself; "
                               "remove the link")
    if len(entries) < 2:
        found = f"only {entries[0]!r}" if entries else "none"
        raise DatasetError(f"{root} needs a sub-folder per class, at least two (found {found}); a classifier "
                           "cannot learn from one class")
    return entries


class ImageFolder(DatasetFolder):
    """ImageFolder with the checks above; `classes`, `targets` and `samples` as torchvision's."""

    def __init__(self, root: Path, transform: Callable[[Any], Any] | None = None) -> None:
        super().__init__(str(root), loader=read_image, extensions=IMG_EXTENSIONS, transform=transform)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = class_names(Path(directory))
        return classes, {name: index for index, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory: str | Path, class_to_idx: dict[str, int], extensions: tuple[str, ...] | None = None,
                     is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        samples: list[tuple[str, int]] = []
        for name, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
            found = _images_under(Path(directory) / name, extensions or IMG_EXTENSIONS)
            if not found:
                raise DatasetError(f"class folder {Path(directory) / name} holds no image file "
                                   f"({', '.join(IMG_EXTENSIONS[:4])}, ...); add images or remove the folder")
            samples += [(path, index) for path in found]
        return samples


def _images_under(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    """Regular image files below `folder`; symlinked sub-folders are not entered (a link to `..` would loop)."""
    found = []
    for top, folders, files in os.walk(folder, followlinks=False, onerror=_walk_error):
        folders[:] = sorted(d for d in folders if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(top, name)
            if name.lower().endswith(extensions) and not name.startswith(".") and os.path.isfile(path):
                found.append(path)
    return found


def _walk_error(exc: OSError) -> None:
    raise DatasetError(f"cannot read {exc.filename} ({exc.strerror or exc}); make it readable or move it out of "
                       "the data folder")


def read_image(path: str) -> Image.Image:
    """The image as 8-bit RGB (the transform makes it grey where the model wants one channel)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                upright = ImageOps.exif_transpose(opened)  # a phone's portrait photo is stored sideways
                image = upright.copy() if upright.mode in _WIDE_MODES else upright.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise DatasetError(f"cannot read the image {path} ({reason}); replace it or move it out of the data folder") from None
    return _to_8_bits(image).convert("RGB") if image.mode in _WIDE_MODES else image


def _to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) grey image scaled to 0..255 by its type's range, not clipped at 255."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else float(values.max())
    return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
