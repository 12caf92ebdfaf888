"""Tensor codecs for the checkpoint: how one weight is stored on disk and read back.

A codec turns a float tensor plus its spec (JSON-able dict, kept in the metadata)
into named stored tensors, and back. `decode(encode(w))` must equal the in-memory
weight exactly, so a reloaded model gives bit-identical outputs.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from dnnprune.errors import CheckpointError

SEPARATOR = "::"


class Codec(Protocol):
    def encode(self, weight: torch.Tensor, spec: dict[str, Any]) -> dict[str, torch.Tensor]: ...

    def decode(self, parts: dict[str, torch.Tensor], spec: dict[str, Any]) -> torch.Tensor: ...


_CODECS: dict[str, Codec] = {}


def register_codec(name: str, codec: Codec) -> None:
    if name in _CODECS:
        raise ValueError(f"codec {name!r} is registered twice")
    _CODECS[name] = codec


def get_codec(name: str) -> Codec:
    _load_codecs()
    if name not in _CODECS:
        raise CheckpointError(
            f"checkpoint uses encoding {name!r}, which this dnnprune does not know; upgrade dnnprune"
        )
    return _CODECS[name]


def encode_state(
    state: dict[str, torch.Tensor], encodings: dict[str, dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """Replace each encoded tensor by its stored parts, named `tensor::part`."""
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        spec = encodings.get(name)
        if spec is None:
            stored[name] = tensor
            continue
        try:
            parts = get_codec(spec["codec"]).encode(tensor, spec)
        except CheckpointError as exc:
            raise CheckpointError(f"{name}: {exc}") from None
        for part, value in parts.items():
            stored[f"{name}{SEPARATOR}{part}"] = value
    return stored


def decode_state(
    stored: dict[str, torch.Tensor], encodings: dict[str, dict[str, Any]]
) -> dict[str, torch.Tensor]:
    plain = {k: v for k, v in stored.items() if SEPARATOR not in k}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in stored.items():
        if SEPARATOR in key:
            name, part = key.split(SEPARATOR, 1)
            grouped.setdefault(name, {})[part] = value
    for name, spec in encodings.items():
        if name not in grouped:
            raise CheckpointError(f"checkpoint metadata encodes {name!r} but its tensors are missing; the file is corrupt")
        plain[name] = get_codec(spec["codec"]).decode(grouped.pop(name), spec)
    if grouped:
        raise CheckpointError(f"checkpoint holds encoded tensors without metadata: {sorted(grouped)}; the file is corrupt")
    return plain


def _load_codecs() -> None:
    """Codecs live beside the algorithms that make them; import them explicitly."""
    from dnnprune import quantization  # noqa: F401
