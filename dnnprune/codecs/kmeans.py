"""K-means codec (weight sharing, Han et al. 2016): a float32 codebook and packed codes.

The codebook is the tensor's distinct values (at most 2^bits), so encoding is exact. Exact zeros
(pruned weights) get a centroid of their own fixed at 0, as in Deep Compression.
"""

from __future__ import annotations

import math

import torch

from dnnprune.codecs._parts import (
    corrupt,
    exact_numel,
    finite,
    only_parts,
    part,
    shape_tensor,
    stored_shape,
)
from dnnprune.codecs.bitpack import pack_bits, packed_nbytes, unpack_bits
from dnnprune.codecs.spec import KMeansSpec
from dnnprune.errors import CheckpointError


def kmeans_grid(weight: torch.Tensor, bits: int, iterations: int) -> torch.Tensor:
    """Every weight replaced by the nearest of 2^bits centroids (exact zeros stay zero)."""
    codebook, codes = kmeans_codebook(weight, bits, iterations)
    return codebook[codes].reshape(weight.shape)


def kmeans_codebook(weight: torch.Tensor, bits: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook (float32) and one code per weight.

    A layer with at most 2^bits distinct values keeps them exactly. Exact zeros get a centroid of
    their own fixed at 0, and the remaining 2^bits - 1 cluster the non-zero weights, as in Deep
    Compression where only surviving weights are shared.
    """
    flat = weight.reshape(-1).float()
    k = 1 << bits
    distinct = torch.unique(flat)
    if distinct.numel() <= k:
        return distinct, torch.searchsorted(distinct, flat)
    zero = flat == 0
    if not bool(zero.any()):
        centroids = lloyd_1d(flat, k, iterations).float()
        return centroids, _nearest(centroids, flat)
    centroids = lloyd_1d(flat[~zero], k - 1, iterations).float()
    codes = torch.zeros_like(flat, dtype=torch.long)
    codes[~zero] = 1 + _nearest(centroids, flat[~zero])
    return torch.cat([torch.zeros(1), centroids]), codes


def lloyd_1d(values: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    """1-D k-means from centroids spread evenly over [min, max]; sorted float64 centroids.

    On sorted values every cluster is a contiguous run, so one step is a binary search of the
    midpoints plus prefix sums: O(k log n) per iteration after one sort.
    """
    xs = torch.sort(values.double().reshape(-1)).values
    distinct = torch.unique_consecutive(xs)
    if distinct.numel() <= k:
        return distinct
    prefix = torch.cat([xs.new_zeros(1), torch.cumsum(xs, 0)])
    ends = torch.tensor([0, xs.numel()])
    centroids = torch.linspace(float(xs[0]), float(xs[-1]), k, dtype=torch.float64)
    edges: torch.Tensor | None = None
    for _ in range(iterations):
        inner = torch.searchsorted(xs, (centroids[1:] + centroids[:-1]) / 2, right=True)
        new_edges = torch.cat([ends[:1], inner, ends[1:]])
        if edges is not None and torch.equal(new_edges, edges):
            break
        edges = new_edges
        counts = edges[1:] - edges[:-1]
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        centroids = torch.sort(torch.where(counts > 0, sums / counts.clamp(min=1), centroids)).values
    return centroids


def _nearest(sorted_centroids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(values, (sorted_centroids[1:] + sorted_centroids[:-1]) / 2)


def codebook_of(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored codebook (the weight's distinct values) and every weight's code; refuses off-grid weights."""
    flat = weight.reshape(-1).float() + 0.0  # a signed zero is stored as +0.0
    codebook = torch.unique(flat)
    if codebook.numel() > 1 << bits:
        raise CheckpointError(
            f"is stored as {bits}-bit kmeans but holds {codebook.numel()} distinct values, more than its "
            f"{1 << bits} centroids: it changed after quantization (a step that trains or edits a quantized "
            "checkpoint must keep its weights on the codebook); quantize the float checkpoint instead"
        )
    return codebook, torch.searchsorted(codebook, flat)


def encode_dense(weight: torch.Tensor, spec: KMeansSpec) -> dict[str, torch.Tensor]:
    codebook, codes = codebook_of(weight, spec.bits)
    return {"codes": pack_bits(codes, spec.bits), "codebook": codebook, "shape": shape_tensor(weight)}


def decode_dense(parts: dict[str, torch.Tensor], spec: KMeansSpec) -> torch.Tensor:
    only_parts(parts, {"codes", "codebook", "shape"})
    shape = stored_shape(parts)
    return decode_entries(parts, spec, shape, math.prod(shape)).reshape(shape)


def encode_entries(weight: torch.Tensor, spec: KMeansSpec, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """The whole tensor's codebook (so a filler's zero has a code) and the codes at `positions`."""
    codebook, codes = codebook_of(weight, spec.bits)
    return {"codes": pack_bits(codes[positions], spec.bits), "codebook": codebook}


def decode_entries(parts: dict[str, torch.Tensor], spec: KMeansSpec, shape: tuple[int, ...],
                   count: int) -> torch.Tensor:
    codebook = finite(part(parts, "codebook", torch.float32), "part 'codebook'")
    if codebook.numel() > 1 << spec.bits or (count and not codebook.numel()):
        raise corrupt(f"the codebook holds {codebook.numel()} values for {spec.bits}-bit codes")
    packed = part(parts, "codes", torch.uint8)
    exact_numel(packed, packed_nbytes(count, spec.bits), "part 'codes'")
    codes = unpack_bits(packed, spec.bits, count)
    if codes.numel() and int(codes.max()) >= codebook.numel():
        raise corrupt("kmeans codes point past the end of their codebook")
    return codebook[codes]
