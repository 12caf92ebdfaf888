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


def write_creditcard(path: Path, rows: int = 3000, fraud_rate: float = 0.02, seed: int = 0) -> Path:
    """A file in the Kaggle credit-card layout, down to its quoting: a quoted header (Time, V1..V28, Amount,
    Class), unquoted numbers and the label quoted ("0" normal, "1" fraud). Frauds are shifted in a few
    PCA components, as in the real data, so an autoencoder trained on normal rows can find them."""
    rng = np.random.default_rng(seed)
    frauds = max(3, round(rows * fraud_rate))
    labels = np.zeros(rows, dtype=np.int64)
    labels[rng.choice(rows, frauds, replace=False)] = 1
    features = rng.normal(size=(rows, 28))
    features[labels == 1, :6] += rng.normal(3.0, 1.0, size=(frauds, 6))
    time = np.sort(rng.uniform(0, 172792, rows)).round()
    amount = np.round(rng.lognormal(3.0, 1.2, rows), 2)
    header = ",".join(f'"{name}"' for name in ["Time", *(f"V{i}" for i in range(1, 29)), "Amount", "Class"])
    lines = [header]
    for t, v, a, c in zip(time, features, amount, labels):
        lines.append(",".join([f"{t:.1f}", *(f"{x:.6f}" for x in v), f"{a:.2f}", f'"{c}"']))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_cifar_binary(root: Path, name: str = "cifar10", per_file: int = 20) -> Path:
    """CIFAR's binary version: records of label byte(s) then the 3,072 R, G, B plane bytes. Image i of a file
    has label i % classes and every pixel of its red plane equal to i, so a reader can be checked exactly."""
    folder, files, label_bytes, classes = {
        "cifar10": ("cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"], 1, 10),
        "cifar100": ("cifar-100-binary", ["train.bin", "test.bin"], 2, 100)}[name]
    (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for file in files:
        records = []
        for i in range(per_file):
            labels = [i % 20, i % classes] if label_bytes == 2 else [i % classes]
            planes = rng.integers(0, 256, 3 * 1024, dtype=np.uint8)
            planes[:1024] = i
            records.append(bytes(labels) + planes.tobytes())
        (root / folder / file).write_bytes(b"".join(records))
    return root / folder
