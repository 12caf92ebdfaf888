"""Sparse execution of Linear layers on the CPU with torch.sparse CSR kernels, where it is faster.

Unstructured sparsity saves bytes on disk; whether it saves CPU time depends on the layer, the
density and the batch. This module measures it (dense `F.linear` against CSR `W @ x`, interleaved,
medians of many repeats) and swaps in `SparseLinear` only where the CSR kernel won. Convolutions
stay dense: torch has no sparse convolution kernel on the CPU.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class SparseLinear(nn.Module):
    """y = x W^T + b with W stored as CSR; same numbers as the dense layer up to float summation order."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that sparse CSR support is in beta
            self.weight_csr = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = (self.weight_csr @ flat.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def _median_ms(run: Callable[[], Any], repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


@torch.inference_mode()
def time_layer(linear: nn.Linear, batch: int, repeats: int = 50) -> dict[str, float]:
    """Dense and CSR medians for one layer at one batch size, measured interleaved."""
    sparse = SparseLinear(linear)
    x = torch.randn(batch, linear.in_features)
    for _ in range(5):
        F.linear(x, linear.weight, linear.bias)
        sparse(x)
    dense_runs, sparse_runs = [], []
    for _ in range(repeats):
        dense_runs.append(_median_ms(lambda: F.linear(x, linear.weight, linear.bias), 1))
        sparse_runs.append(_median_ms(lambda: sparse(x), 1))
    dense_ms, sparse_ms = statistics.median(dense_runs), statistics.median(sparse_runs)
    return {"dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms if sparse_ms else 0.0}


def measure_linears(model: nn.Module, names: Sequence[str], batch_sizes: Sequence[int],
                    repeats: int = 50) -> list[dict[str, Any]]:
    """One row per (Linear layer, batch size): density, dense and CSR latency, speedup."""
    rows = []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            continue
        layer_density = float(torch.count_nonzero(layer.weight)) / max(1, layer.weight.numel())
        for batch in batch_sizes:
            rows.append({"layer": name, "density": layer_density, "batch_size": batch,
                         **time_layer(layer.cpu().eval(), batch, repeats)})
    return rows


def with_sparse_linears(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy of the model whose named Linear layers run as CSR (for timing or deployment on the CPU)."""
    converted = copy.deepcopy(model).cpu().eval()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = converted.get_submodule(parent_name) if parent_name else converted
        setattr(parent, child, SparseLinear(converted.get_submodule(name)))
    return converted


def faster_layers(rows: Sequence[dict[str, Any]], batch: int, min_speedup: float = 1.1) -> list[str]:
    """The layers whose CSR kernel beat the dense one by `min_speedup` at `batch`."""
    return [row["layer"] for row in rows if row["batch_size"] == batch and row["speedup"] >= min_speedup]
