"""Typed encoding specs, as kept in the checkpoint metadata: what a tensor's stored form is.

Specs stack: `sparse` says how the positions of the non-zeros are stored, `values` how the values
are (float32 when absent). JSON: `{"sparse": {"index_bits": 8}, "values": {"codec": "kmeans", "bits": 5}}`.
The flat form `{"codec": "kmeans", "bits": 5}` of format-1 checkpoints reads as `{"values": {...}}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_serializer,
    model_validator,
)

from dnnprune.errors import CheckpointError

ValueBits = Annotated[int, Field(ge=2, le=8, strict=True)]
IndexBits = Annotated[int, Field(ge=2, le=16, strict=True)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinearSpec(_Spec):
    """Symmetric per-output-channel codes: int8 at 8 bits, packed below."""

    codec: Literal["linear"] = "linear"
    bits: ValueBits = 8


class KMeansSpec(_Spec):
    """Weight sharing: a codebook of at most 2^bits values and one packed code per weight."""

    codec: Literal["kmeans"] = "kmeans"
    bits: ValueBits = 5


class SparseSpec(_Spec):
    """Only non-zeros are stored; `index_bits` is the width of a relative index (Deep Compression)."""

    index_bits: IndexBits = 8


ValueSpec = Annotated[LinearSpec | KMeansSpec, Field(discriminator="codec")]


class Encoding(_Spec):
    """How one tensor is stored; at least one of `sparse` and `values` is set."""

    sparse: SparseSpec | None = None
    values: ValueSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_flat_form(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "codec" in data:
            return {"values": dict(data)}
        return data

    @model_validator(mode="after")
    def _not_empty(self) -> Encoding:
        if self.sparse is None and self.values is None:
            raise ValueError("an encoding sets `sparse`, `values` or both")
        return self

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}

    def describe(self) -> str:
        """Short label for messages and reports, e.g. `sparse+kmeans5`."""
        parts = ["sparse"] if self.sparse is not None else []
        if self.values is not None:
            parts.append(f"{self.values.codec}{self.values.bits}")
        return "+".join(parts)


def as_encoding(value: Encoding | Mapping[str, Any]) -> Encoding:
    """An `Encoding` from itself or its JSON form; a bad one is a one-line CheckpointError."""
    if isinstance(value, Encoding):
        return value
    try:
        return Encoding.model_validate(value)
    except ValidationError as exc:
        raise CheckpointError(f"invalid encoding {value!r}: {one_line(exc)}; use e.g. "
                              '{"values": {"codec": "kmeans", "bits": 5}} or {"sparse": {"index_bits": 8}}') from None


def one_line(exc: ValidationError) -> str:
    """Every problem of a pydantic error on one line, as `key.path: reason`."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        reason = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        parts.append(f"{key}: {reason}")
    return " ".join("; ".join(parts).split())
