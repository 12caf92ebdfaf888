"""Sparse codec (Deep Compression storage, Han et al. 2016): only the non-zeros are stored.

Their positions are kept in whichever form is smaller for the tensor:
- `mask`: a packed bitmask, one bit per weight;
- `index`: relative indices, the count of zeros skipped before each entry, packed at `index_bits`;
  a run longer than 2^index_bits - 1 zeros is bridged by filler entries whose value is zero.
The part present says which form was chosen. The entries' values are float32 (`values`), or, when a
value codec is stacked, its integer codes packed at its bits beside its codebook or scales.
"""

from __future__ import annotations

import math

import torch

from dnnprune.codecs import kmeans, linear
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
from dnnprune.codecs.spec import Encoding, KMeansSpec, LinearSpec, SparseSpec

_FLOAT_BITS = 32


def encode(weight: torch.Tensor, encoding: Encoding) -> dict[str, torch.Tensor]:
    spec = _sparse(encoding)
    flat = weight.reshape(-1)
    nonzero = flat != 0
    positions = nonzero.nonzero().squeeze(1)
    skips = _skips(positions)
    value_bits = _value_bits(encoding)
    entries = int((skips >> spec.index_bits).sum()) + positions.numel()
    as_index = packed_nbytes(entries, spec.index_bits) + packed_nbytes(entries, value_bits)
    as_mask = packed_nbytes(flat.numel(), 1) + packed_nbytes(positions.numel(), value_bits)
    if as_index < as_mask:
        stored = _with_fillers(skips, spec.index_bits)
        positions = torch.cumsum(stored + 1, 0) - 1
        parts = {"index": pack_bits(stored, spec.index_bits)}
    else:
        parts = {"mask": pack_bits(nonzero.to(torch.uint8), 1)}
    parts["shape"] = shape_tensor(weight)
    parts["count"] = torch.tensor([positions.numel()], dtype=torch.int64)
    parts.update(_encode_values(weight, encoding, positions))
    return parts


def decode(parts: dict[str, torch.Tensor], encoding: Encoding) -> torch.Tensor:
    spec = _sparse(encoding)
    shape = stored_shape(parts)
    numel = math.prod(shape)
    only_parts(parts, {"shape", "count", "mask", "index"} | _value_parts(encoding))
    count_part = part(parts, "count", torch.int64)
    exact_numel(count_part, 1, "part 'count'")
    count = int(count_part[0])
    if not 0 <= count <= numel:
        raise corrupt(f"a sparse tensor of {numel} values claims {count} stored entries")
    if ("mask" in parts) == ("index" in parts):
        raise corrupt("a sparse tensor needs exactly one of the parts 'mask' and 'index'")
    if "mask" in parts:
        positions = _mask_positions(part(parts, "mask", torch.uint8), numel, count)
    else:
        positions = _index_positions(part(parts, "index", torch.uint8), spec.index_bits, numel, count)
    dense = torch.zeros(numel, dtype=torch.float32)
    dense[positions] = _decode_values(parts, encoding, shape, positions)
    return dense.reshape(shape)


def _sparse(encoding: Encoding) -> SparseSpec:
    if encoding.sparse is None:
        raise ValueError("the sparse codec needs an encoding with `sparse` set")
    return encoding.sparse


def _skips(positions: torch.Tensor) -> torch.Tensor:
    """Zeros skipped before each non-zero (the first counts from the start)."""
    previous = torch.cat([positions.new_full((1,), -1), positions[:-1]])
    return positions - previous - 1


def _with_fillers(skips: torch.Tensor, index_bits: int) -> torch.Tensor:
    """Relative indices that fit `index_bits`: each filler skips 2^b - 1 zeros and sits on a zero."""
    fillers = skips >> index_bits
    per_entry = fillers + 1
    real = torch.cumsum(per_entry, 0) - 1
    stored = torch.full((int(per_entry.sum()),), (1 << index_bits) - 1, dtype=torch.int64)
    stored[real] = skips & ((1 << index_bits) - 1)
    return stored


def _mask_positions(mask: torch.Tensor, numel: int, count: int) -> torch.Tensor:
    exact_numel(mask, packed_nbytes(numel, 1), "part 'mask'")
    bits = ((mask[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1).bool()
    if bool(bits[numel:].any()) or int(bits.sum()) != count:
        raise corrupt(f"the sparse mask does not hold the {count} entries it claims")
    return bits[:numel].nonzero().squeeze(1)


def _index_positions(index: torch.Tensor, index_bits: int, numel: int, count: int) -> torch.Tensor:
    exact_numel(index, packed_nbytes(count, index_bits), "part 'index'")
    positions = torch.cumsum(unpack_bits(index, index_bits, count) + 1, 0) - 1
    if positions.numel() and int(positions[-1]) >= numel:
        raise corrupt(f"sparse indices run past the end of a tensor of {numel} values")
    return positions


def _value_bits(encoding: Encoding) -> int:
    return _FLOAT_BITS if encoding.values is None else encoding.values.bits


def _value_parts(encoding: Encoding) -> set[str]:
    if encoding.values is None:
        return {"values"}
    return {"codes", "scales"} if isinstance(encoding.values, LinearSpec) else {"codes", "codebook"}


def _encode_values(weight: torch.Tensor, encoding: Encoding, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    values = encoding.values
    if isinstance(values, LinearSpec):
        return linear.encode_entries(weight, values, positions)
    if isinstance(values, KMeansSpec):
        return kmeans.encode_entries(weight, values, positions)
    return {"values": weight.reshape(-1)[positions].float() + 0.0}  # a filler's signed zero is stored as +0.0


def _decode_values(parts: dict[str, torch.Tensor], encoding: Encoding, shape: tuple[int, ...],
                   positions: torch.Tensor) -> torch.Tensor:
    values = encoding.values
    if isinstance(values, LinearSpec):
        return linear.decode_entries(parts, values, shape, positions)
    if isinstance(values, KMeansSpec):
        return kmeans.decode_entries(parts, values, shape, positions.numel())
    stored = finite(part(parts, "values", torch.float32), "part 'values'")
    exact_numel(stored, positions.numel(), "part 'values'")
    return stored
