"""Linear codec: symmetric, one scale per output channel, codes in [-(2^(b-1)-1), 2^(b-1)-1].

Dense form: int8 codes shaped like the weight at 8 bits, else codes + 2^(b-1)-1 packed at b bits
beside the int64 shape; float32 scales either way. Stacked under `sparse`, only the entries' codes
are packed, and each entry finds its scale from its position.
"""

from __future__ import annotations

import math

import torch

from dnnprune.codecs._parts import (
    check_shape,
    corrupt,
    exact_numel,
    finite,
    only_parts,
    part,
    shape_tensor,
    stored_shape,
)
from dnnprune.codecs.bitpack import pack_bits, packed_nbytes, unpack_bits
from dnnprune.codecs.spec import LinearSpec
from dnnprune.errors import CheckpointError

_SCALE_BITS = 16  # significant bits kept in a scale: code x scale is then exact in float32


def qmax_of(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def linear_grid(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel quantization, returned dequantized."""
    qmax = qmax_of(bits)
    if not weight.numel():
        return weight.float().clone()
    rows = _rows(weight)
    scale = round_significand(rows.abs().amax(1) / qmax)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(rows / safe[:, None]), -qmax, qmax)
    return (codes * scale[:, None]).reshape(weight.shape)


def round_significand(x: torch.Tensor) -> torch.Tensor:
    mantissa, exponent = torch.frexp(x.double())
    return torch.ldexp(torch.round(mantissa * 2.0**_SCALE_BITS) / 2.0**_SCALE_BITS, exponent.double()).float()


def linear_codes(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (float, rows x cols) and scales that reproduce a weight on a linear grid exactly.

    The scale is max|row| / m for the largest m <= qmax that fits; trying smaller m covers a row whose
    largest code was cut away (its input channel pruned after quantization).
    """
    qmax = qmax_of(bits)
    if weight.dim() == 0:
        raise CheckpointError("is a scalar, which the linear codec cannot store; leave it out of the encodings")
    rows = _rows(weight)
    amax = rows.abs().amax(1) if rows.numel() else rows.new_zeros(rows.shape[0])
    scales = torch.zeros_like(amax)
    codes = torch.zeros_like(rows)
    todo = amax > 0
    for m in range(qmax, 0, -1):
        if not bool(todo.any()):
            break
        idx = todo.nonzero().squeeze(1)
        s = amax[idx] / m
        q = torch.round(rows[idx] / s[:, None])
        ok = (q * s[:, None] == rows[idx]).all(1)
        scales[idx[ok]], codes[idx[ok]] = s[ok], q[ok]
        todo[idx[ok]] = False
    if bool(todo.any()) or not bool(torch.isfinite(rows).all()):
        raise CheckpointError(
            f"is stored as {bits}-bit linear but its values are off their grid: they changed after quantization "
            "(a step that trains or edits a quantized checkpoint must keep its weights); quantize the float checkpoint instead"
        )
    return codes, scales


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """One row per output channel (explicit sizes: a zero-size tensor cannot infer -1)."""
    return weight.reshape(weight.shape[0], math.prod(weight.shape[1:])).float()


def encode_dense(weight: torch.Tensor, spec: LinearSpec) -> dict[str, torch.Tensor]:
    codes, scales = linear_codes(weight, spec.bits)
    if spec.bits == 8:
        return {"codes": codes.to(torch.int8).reshape(weight.shape), "scales": scales}
    return {"codes": pack_bits(codes.long() + qmax_of(spec.bits), spec.bits), "scales": scales,
            "shape": shape_tensor(weight)}


def dense_shape(parts: dict[str, torch.Tensor], spec: LinearSpec) -> tuple[int, ...]:
    if spec.bits == 8 and "shape" not in parts:
        shape = tuple(part(parts, "codes", torch.int8, ndim=None).shape)
        check_shape(shape)
        return shape
    return stored_shape(parts)


def decode_dense(parts: dict[str, torch.Tensor], spec: LinearSpec) -> torch.Tensor:
    shape = dense_shape(parts, spec)
    if spec.bits == 8 and "shape" not in parts:
        only_parts(parts, {"codes", "scales"})
        codes = part(parts, "codes", torch.int8, ndim=None).reshape(-1).long()
    else:
        only_parts(parts, {"codes", "scales", "shape"})
        packed = part(parts, "codes", torch.uint8)
        exact_numel(packed, packed_nbytes(math.prod(shape), spec.bits), "part 'codes'")
        codes = unpack_bits(packed, spec.bits, math.prod(shape)) - qmax_of(spec.bits)
    return values_at(parts, spec, shape, codes, positions=None).reshape(shape)


def encode_entries(weight: torch.Tensor, spec: LinearSpec, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Codes of the entries at `positions` (flat indices), packed, and every row's scale."""
    codes, scales = linear_codes(weight, spec.bits)
    picked = codes.reshape(-1)[positions].long() + qmax_of(spec.bits)
    return {"codes": pack_bits(picked, spec.bits), "scales": scales}


def decode_entries(parts: dict[str, torch.Tensor], spec: LinearSpec, shape: tuple[int, ...],
                   positions: torch.Tensor) -> torch.Tensor:
    packed = part(parts, "codes", torch.uint8)
    exact_numel(packed, packed_nbytes(positions.numel(), spec.bits), "part 'codes'")
    codes = unpack_bits(packed, spec.bits, positions.numel()) - qmax_of(spec.bits)
    return values_at(parts, spec, shape, codes, positions)


def values_at(parts: dict[str, torch.Tensor], spec: LinearSpec, shape: tuple[int, ...], codes: torch.Tensor,
              positions: torch.Tensor | None) -> torch.Tensor:
    """code x scale of its row, in float32 exactly as the dense form computes it."""
    if not shape:
        raise corrupt("a linear-coded tensor has no output dimension")
    qmax = qmax_of(spec.bits)
    if codes.numel() and (int(codes.min()) < -qmax or int(codes.max()) > qmax):
        raise corrupt(f"linear codes fall outside [-{qmax}, {qmax}]")
    scales = finite(part(parts, "scales", torch.float32), "part 'scales'")
    exact_numel(scales, shape[0], "part 'scales'")
    if not codes.numel():
        return torch.zeros(0)
    if positions is None:
        return (codes.reshape(shape[0], -1).float() * scales[:, None]).reshape(-1)
    return codes.float() * scales[positions // math.prod(shape[1:])]
