"""Encode and decode tensors and whole state dicts by their `Encoding`.

`decode(encode(w))` equals `w` exactly (every encode is checked by decoding it), so a reloaded
model gives bit-identical outputs; a tensor that left its grid is refused with the fix named. The
one normalisation: a zero is stored as +0.0 whatever its sign (pruning by `w * mask` makes -0.0),
so `on_grid(w)` is the exact bits a reload gives.
Stored parts are named `tensor::part` beside the plain tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dnnprune.codecs import kmeans, linear, sparse
from dnnprune.codecs._parts import corrupt, stored_shape
from dnnprune.codecs.spec import Encoding, KMeansSpec, LinearSpec, as_encoding
from dnnprune.errors import CheckpointError

SEPARATOR = "::"
EncodingLike = Encoding | Mapping[str, Any]


def encode_tensor(weight: torch.Tensor, encoding: EncodingLike) -> dict[str, torch.Tensor]:
    """The stored parts of one tensor; refuses one its encoding cannot hold exactly."""
    spec = as_encoding(encoding)
    weight = _storable(weight)
    parts = _encode(weight, spec)
    if not torch.equal(decode_tensor(parts, spec), weight):
        raise CheckpointError(f"does not survive its {spec.describe()} encoding exactly; quantize the float checkpoint again")
    return parts


def decode_tensor(parts: dict[str, torch.Tensor], encoding: EncodingLike) -> torch.Tensor:
    """The float32 tensor; every part is checked, so a corrupt file raises CheckpointError."""
    spec = as_encoding(encoding)
    if spec.sparse is not None:
        return sparse.decode(parts, spec)
    if isinstance(spec.values, LinearSpec):
        return linear.decode_dense(parts, spec.values)
    if isinstance(spec.values, KMeansSpec):
        return kmeans.decode_dense(parts, spec.values)
    raise ValueError(f"unhandled encoding {spec!r}")


def on_grid(weight: torch.Tensor, encoding: EncodingLike) -> torch.Tensor:
    """The weight exactly as a checkpoint will store and reload it."""
    return decode_tensor(encode_tensor(weight, encoding), encoding)


def encoded_nbytes(weight: torch.Tensor, encoding: EncodingLike) -> int:
    """Bytes the stored parts take (without the file header)."""
    return sum(t.nbytes for t in encode_tensor(weight, encoding).values())


def declared_shape(parts: dict[str, torch.Tensor], encoding: EncodingLike) -> tuple[int, ...]:
    """The shape decoding will produce, read from the parts without decoding them."""
    spec = as_encoding(encoding)
    if spec.sparse is None and isinstance(spec.values, LinearSpec):
        return linear.dense_shape(parts, spec.values)
    return stored_shape(parts)


def encode_state(state: Mapping[str, torch.Tensor], encodings: Mapping[str, EncodingLike]) -> dict[str, torch.Tensor]:
    """Replace each encoded tensor by its stored parts, named `tensor::part`."""
    missing = sorted(set(encodings) - set(state))
    if missing:
        raise CheckpointError(f"the metadata encodes {missing[:3]}, which the model does not have; "
                              "drop them from the encodings")
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if SEPARATOR in name:
            raise CheckpointError(f"tensor name {name!r} contains {SEPARATOR!r}, which checkpoints reserve; rename it")
        if name not in encodings:
            stored[name] = tensor
            continue
        try:
            parts = encode_tensor(tensor, encodings[name])
        except CheckpointError as exc:
            raise CheckpointError(f"{name}: {exc}") from None
        stored.update({f"{name}{SEPARATOR}{part}": value for part, value in parts.items()})
    return stored


def decode_state(stored: Mapping[str, torch.Tensor], encodings: Mapping[str, EncodingLike]) -> dict[str, torch.Tensor]:
    """The state dict back: plain tensors as stored, encoded ones decoded."""
    plain, grouped = _grouped(stored, encodings)
    for name, parts in grouped.items():
        try:
            plain[name] = decode_tensor(parts, encodings[name])
        except CheckpointError as exc:
            raise CheckpointError(f"tensor {name!r}: {exc}") from None
    return plain


def declared_tensors(stored: Mapping[str, torch.Tensor],
                     encodings: Mapping[str, EncodingLike]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor's shape and dtype after decoding, known before anything is decoded."""
    plain, grouped = _grouped(stored, encodings)
    declared = {name: (tuple(t.shape), t.dtype) for name, t in plain.items()}
    for name, parts in grouped.items():
        try:
            declared[name] = (declared_shape(parts, encodings[name]), torch.float32)
        except CheckpointError as exc:
            raise CheckpointError(f"tensor {name!r}: {exc}") from None
    return declared


def _grouped(stored: Mapping[str, torch.Tensor], encodings: Mapping[str, EncodingLike]
             ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    plain: dict[str, torch.Tensor] = {}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in stored.items():
        name, separator, part = key.partition(SEPARATOR)
        if separator:
            grouped.setdefault(name, {})[part] = value
        else:
            plain[key] = value
    if set(grouped) != set(encodings) or set(grouped) & set(plain):
        raise corrupt(f"the encoded tensors {sorted(grouped)[:3]} do not match the metadata's encodings "
                      f"{sorted(encodings)[:3]}")
    return plain, grouped


def _storable(weight: torch.Tensor) -> torch.Tensor:
    weight = weight.detach().cpu()
    if weight.dtype != torch.float32:
        raise CheckpointError(f"is {weight.dtype}, but encoded tensors are float32; convert the model with .float()")
    if not bool(torch.isfinite(weight).all()):
        raise CheckpointError("holds NaN or infinite values, which an encoding cannot store; "
                              "fix the training (e.g. a lower learning rate) or drop the encoding")
    return weight.contiguous()


def _encode(weight: torch.Tensor, spec: Encoding) -> dict[str, torch.Tensor]:
    if spec.sparse is not None:
        return sparse.encode(weight, spec)
    if isinstance(spec.values, LinearSpec):
        return linear.encode_dense(weight, spec.values)
    if isinstance(spec.values, KMeansSpec):
        return kmeans.encode_dense(weight, spec.values)
    raise ValueError(f"unhandled encoding {spec!r}")
