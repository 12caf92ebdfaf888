"""Bit packing: integer codes stored at `bits` bits each, least significant bit first.

Vectorised and chunked, so packing a large layer never builds a bit stream of the whole tensor.
"""

from __future__ import annotations

import math

import torch

from dnnprune.errors import CheckpointError

MAX_BITS = 16
_CHUNK = 1 << 20  # codes per packing step; a multiple of 8, so every step fills whole bytes


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that `count` codes take at `bits` bits each."""
    return math.ceil(count * bits / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) as a flat uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack at {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8, copy=True)
    work = torch.uint8 if bits < 8 else torch.int32
    flat = flat.to(work)
    code_shifts = torch.arange(bits, dtype=work)
    byte_shifts = torch.arange(8, dtype=torch.uint8)
    out = []
    for start in range(0, flat.numel(), _CHUNK):
        stream = ((flat[start:start + _CHUNK, None] >> code_shifts) & 1).to(torch.uint8).reshape(-1)
        stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)])
        out.append((stream.view(-1, 8) << byte_shifts).sum(1).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes of `pack_bits`, as int64."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or count < 0 or packed.numel() < packed_nbytes(count, bits):
        raise CheckpointError(f"packed codes hold too few bytes for {count} {bits}-bit codes; the file is corrupt")
    packed = packed.reshape(-1)
    if bits == 8:
        return packed[:count].long()
    code_shifts = torch.arange(bits)
    byte_shifts = torch.arange(8, dtype=torch.uint8)
    out = []
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * bits // 8
        chunk = packed[first:first + packed_nbytes(n, bits)]
        stream = ((chunk[:, None] >> byte_shifts) & 1).reshape(-1)[: n * bits]
        out.append((stream.view(n, bits).long() << code_shifts).sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
