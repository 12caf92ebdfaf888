"""Tiny datasets in the official file formats, for code paths whose real data is not installed here."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX: big-endian magic (0x08 = uint8, then rank), sizes, raw bytes."""
    head = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train: int = 50, n_test: int = 20, gz: bool = False) -> np.ndarray:
    """Write the four MNIST files; returns the training images for comparison."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{split}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels-idx1-ubyte"] = np.arange(n, dtype=np.uint8) % 10
    for fname, arr in arrays.items():
        blob = idx_bytes(arr)
        (folder / (fname + ".gz" if gz else fname)).write_bytes(gzip.compress(blob) if gz else blob)
    return arrays["train-images-idx3-ubyte"]
