"""Checks shared by the codecs' decoders: every stored part is validated before it is used."""

from __future__ import annotations

import math

import torch

from dnnprune.errors import CheckpointError

MAX_NDIM = 8
MAX_NUMEL = 1 << 48  # far beyond any model; keeps shape arithmetic inside int64


def corrupt(problem: str) -> CheckpointError:
    return CheckpointError(f"{problem}; the file is corrupt")


def shape_tensor(weight: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(weight.shape), dtype=torch.int64)


def part(parts: dict[str, torch.Tensor], name: str, dtype: torch.dtype, ndim: int | None = 1) -> torch.Tensor:
    """The named part, with the dtype (and number of dimensions) it must have."""
    if name not in parts:
        raise corrupt(f"the encoded tensor lacks its {name!r} part")
    tensor = parts[name]
    if tensor.dtype != dtype:
        raise corrupt(f"part {name!r} is {tensor.dtype}, not {dtype}")
    if ndim is not None and tensor.dim() != ndim:
        raise corrupt(f"part {name!r} has {tensor.dim()} dimensions, not {ndim}")
    return tensor


def only_parts(parts: dict[str, torch.Tensor], allowed: set[str]) -> None:
    unknown = sorted(set(parts) - allowed)
    if unknown:
        raise corrupt(f"the encoded tensor has unexpected parts {unknown}")


def stored_shape(parts: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The decoded shape, from the int64 `shape` part, bounded so nothing huge is allocated by mistake."""
    shape = tuple(int(v) for v in part(parts, "shape", torch.int64).tolist())
    check_shape(shape)
    return shape


def check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) > MAX_NDIM or any(s < 0 for s in shape) or math.prod(shape) > MAX_NUMEL:
        raise corrupt(f"the encoded tensor declares an impossible shape {list(shape)[:MAX_NDIM + 1]}")


def exact_numel(tensor: torch.Tensor, count: int, what: str) -> None:
    if tensor.numel() != count:
        raise corrupt(f"{what} holds {tensor.numel()} entries where {count} were expected")


def finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(tensor).all()):
        raise corrupt(f"{what} holds NaN or infinite values")
    return tensor
