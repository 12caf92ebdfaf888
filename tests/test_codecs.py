"""Codecs: packing, exact round trips of every codec and stack, the sparse forms, refusals, corrupt parts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnprune import codecs as c
from dnnprune.codecs import bitpack
from dnnprune.errors import CheckpointError

_SPARSE8 = {"sparse": {"index_bits": 8}}


def _sparse(weight: torch.Tensor, density: float, seed: int = 0) -> torch.Tensor:
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(seed)) < density
    return weight * keep


def _on(weight: torch.Tensor, encoding: dict) -> torch.Tensor:
    """The weight moved onto the grid its encoding's value codec needs."""
    values = c.as_encoding(encoding).values
    if values is None:
        return weight
    if values.codec == "linear":
        return c.linear_grid(weight, values.bits)
    return c.kmeans_grid(weight, values.bits, iterations=20)


def _round_trip(weight: torch.Tensor, encoding: dict) -> dict[str, torch.Tensor]:
    parts = c.encode_tensor(weight, encoding)
    decoded = c.decode_tensor(parts, encoding)
    assert decoded.dtype == torch.float32 and decoded.shape == weight.shape
    signless = weight + 0.0  # zeros are stored as +0.0 whatever their sign
    assert torch.equal(decoded.view(torch.int32), signless.view(torch.int32)), "not bit for bit"
    return parts


# ----------------------------------------------------------------------------- packing


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 16), count=st.integers(0, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits: int, count: int, seed: int) -> None:
    codes = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(seed))
    packed = c.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == c.packed_nbytes(count, bits)
    assert torch.equal(c.unpack_bits(packed, bits, count), codes)


@pytest.mark.parametrize("bits", [1, 3, 8, 11, 16])
def test_packing_across_chunks(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bitpack, "_CHUNK", 16)
    codes = torch.randint(0, 1 << bits, (16 * 5 + 3,))
    assert torch.equal(c.unpack_bits(c.pack_bits(codes, bits), bits, codes.numel()), codes)


def test_packing_refuses_bad_codes_and_short_input() -> None:
    with pytest.raises(ValueError):
        c.pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(CheckpointError, match="corrupt"):
        c.unpack_bits(torch.zeros(2, dtype=torch.uint8), 5, 10)


# ----------------------------------------------------------------------------- specs


def test_specs_validate_stack_and_read_the_legacy_form() -> None:
    stacked = c.as_encoding({"sparse": {"index_bits": 8}, "values": {"codec": "kmeans", "bits": 5}})
    assert stacked.model_dump() == {"sparse": {"index_bits": 8}, "values": {"codec": "kmeans", "bits": 5}}
    assert c.as_encoding({"codec": "linear", "bits": 8}) == c.Encoding(values=c.LinearSpec(bits=8))
    assert c.as_encoding(_SPARSE8).model_dump() == _SPARSE8
    for bad in ({}, {"values": {"codec": "kmeans", "bits": 9}}, {"sparse": {"index_bits": 1}},
                {"sparse": {"index_bits": 17}}, {"values": {"codec": "huffman", "bits": 4}}, {"sparse": {}, "x": 1},
                {"codec": "kmeans", "bits": "5"}, {"values": {"codec": "linear", "bits": True}}):
        with pytest.raises(CheckpointError, match="invalid encoding"):
            c.as_encoding(bad)


# ----------------------------------------------------------------------------- round trips


_ENCODINGS = [
    {"values": {"codec": "linear", "bits": 8}},
    {"values": {"codec": "linear", "bits": 4}},
    {"values": {"codec": "kmeans", "bits": 2}},
    {"values": {"codec": "kmeans", "bits": 5}},
    _SPARSE8,
    {"sparse": {"index_bits": 4}, "values": {"codec": "kmeans", "bits": 5}},
    {"sparse": {"index_bits": 5}, "values": {"codec": "linear", "bits": 8}},
    {"sparse": {"index_bits": 5}, "values": {"codec": "linear", "bits": 3}},
]


@pytest.mark.parametrize("encoding", _ENCODINGS, ids=lambda e: c.as_encoding(e).describe())
@pytest.mark.parametrize("density", [1.0, 0.5, 0.05, 0.0])
def test_every_codec_round_trips_bit_for_bit(encoding: dict, density: float) -> None:
    weight = _on(_sparse(torch.randn(24, 8, 3, 3), density), encoding)
    _round_trip(weight, encoding)
    assert torch.equal(c.on_grid(weight, encoding), weight)


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=4), density=st.floats(0, 1),
       encoding=st.sampled_from(_ENCODINGS), seed=st.integers(0, 2**31 - 1))
def test_round_trip_on_any_shape(shape: list[int], density: float, encoding: dict, seed: int) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    _round_trip(_on(_sparse(weight, density, seed), encoding), encoding)


def test_sparse_picks_the_smaller_position_form() -> None:
    weight = torch.randn(64, 64)
    dense_ish = _round_trip(_sparse(weight, 0.5), _SPARSE8)
    very_sparse = _round_trip(_sparse(weight, 0.01), _SPARSE8)
    assert "mask" in dense_ish and "index" not in dense_ish
    assert "index" in very_sparse and "mask" not in very_sparse
    assert dense_ish["mask"].numel() == 64 * 64 // 8
    count = int(very_sparse["count"][0])
    assert very_sparse["index"].numel() == math.ceil(count * 8 / 8) and very_sparse["values"].numel() == count


def test_long_gaps_are_bridged_by_zero_fillers() -> None:
    weight = -torch.zeros(100_000)  # signed zeros, as `w * mask` leaves them
    weight[[3, 300, 99_999]] = torch.tensor([1.5, -2.0, 0.25])
    parts = _round_trip(weight, {"sparse": {"index_bits": 8}})
    assert "index" in parts
    count = int(parts["count"][0])
    gaps = c.unpack_bits(parts["index"], 8, count)
    # 3 zeros skipped; 296 = one filler (255 skipped, sits on zero 259) + 40; 99698 = 389 fillers + 114
    assert count == 3 + 1 + 389
    assert gaps[:5].tolist() == [3, 255, 40, 255, 255] and int(gaps[-1]) == 114
    values = parts["values"]
    assert int((values != 0).sum()) == 3 and int((values == 0).sum()) == 390


def test_stacked_kmeans_fillers_use_the_zero_centroid() -> None:
    weight = torch.zeros(600)
    weight[[0, 500]] = torch.tensor([0.5, -0.5])
    encoding = {"sparse": {"index_bits": 3}, "values": {"codec": "kmeans", "bits": 2}}
    parts = _round_trip(weight, encoding)
    assert "index" in parts and 0.0 in parts["codebook"].tolist()


@pytest.mark.parametrize("encoding, factor", [
    ({"values": {"codec": "kmeans", "bits": 4}}, 8 * 0.95),
    ({"values": {"codec": "linear", "bits": 8}}, 4 * 0.95),
    (_SPARSE8, 1 / (0.1 * 5 / 4) * 0.9),
    ({"sparse": {"index_bits": 8}, "values": {"codec": "kmeans", "bits": 5}}, 1 / (0.1 * 13 / 32) * 0.9),
])
def test_encoded_size_shrinks_by_the_expected_factor(encoding: dict, factor: float) -> None:
    sparse = c.as_encoding(encoding).sparse is not None
    weight = _on(_sparse(torch.randn(256, 512), 0.1 if sparse else 1.0), encoding)
    assert weight.numel() * 4 / c.encoded_nbytes(weight, encoding) >= factor


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("encoding", _ENCODINGS[:4] + _ENCODINGS[5:], ids=lambda e: c.as_encoding(e).describe())
def test_values_off_their_grid_are_refused(encoding: dict) -> None:
    weight = _on(torch.randn(16, 40), encoding)
    with pytest.raises(CheckpointError, match="changed after quantization|off their grid"):
        c.encode_tensor(weight + 1e-3 * torch.randn_like(weight), encoding)


def test_non_finite_and_non_float32_are_refused_with_the_fix() -> None:
    weight = torch.randn(4, 4)
    weight[1, 1] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        c.encode_tensor(weight, _SPARSE8)
    with pytest.raises(CheckpointError, match=r"\.float\(\)"):
        c.encode_tensor(torch.zeros(3, dtype=torch.float16), _SPARSE8)


def test_any_zero_pattern_is_fine_for_sparse() -> None:
    weight = torch.randn(50, 50)
    weight[::3] = 0
    weight[:, 7] = 0
    _round_trip(weight, _SPARSE8)


# ----------------------------------------------------------------------------- corrupt parts


def _corruptions(parts: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each part dropped, retyped, shortened, lengthened and filled with 0xFF, plus an extra part."""
    variants = [{**parts, "extra": torch.zeros(1)}]
    for name, tensor in parts.items():
        flat = tensor.reshape(-1)
        variants += [
            {k: v for k, v in parts.items() if k != name},
            {**parts, name: tensor.to(torch.float64 if tensor.dtype != torch.float64 else torch.int64)},
            {**parts, name: flat[:-1].clone() if flat.numel() else torch.ones(1, dtype=tensor.dtype)},
            {**parts, name: torch.cat([flat, flat[:1] if flat.numel() else torch.ones(1, dtype=tensor.dtype)])},
            {**parts, name: _filled(tensor)},
        ]
    return variants


def _filled(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype == torch.float32:
        return torch.full_like(tensor, float("inf"))
    if tensor.dtype == torch.int64:
        return torch.full_like(tensor, 1 << 40)
    return torch.full_like(tensor, -128 if tensor.dtype == torch.int8 else 255)


@pytest.mark.parametrize("encoding", _ENCODINGS, ids=lambda e: c.as_encoding(e).describe())
@pytest.mark.parametrize("density", [0.5, 0.02])
def test_corrupt_parts_raise_checkpoint_error(encoding: dict, density: float) -> None:
    weight = _on(_sparse(torch.randn(30, 41), density), encoding)
    parts = c.encode_tensor(weight, encoding)
    for variant in _corruptions(parts):
        try:
            decoded = c.decode_tensor(variant, encoding)
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            continue
        # some changes still decode (other codes, a longer shape): then to what the parts declare, finite
        assert decoded.shape == c.declared_shape(variant, encoding) and bool(torch.isfinite(decoded).all())


def test_state_round_trip_and_mismatched_encodings() -> None:
    state = {"a.weight": _sparse(torch.randn(8, 8), 0.3), "a.bias": torch.randn(8)}
    encodings = {"a.weight": c.Encoding(sparse=c.SparseSpec())}
    stored = c.encode_state(state, encodings)
    assert "a.bias" in stored and all(k.startswith("a.weight::") for k in stored if k != "a.bias")
    assert c.declared_tensors(stored, encodings) == {"a.weight": ((8, 8), torch.float32), "a.bias": ((8,), torch.float32)}
    back = c.decode_state(stored, encodings)
    assert all(torch.equal(back[k], v) for k, v in state.items())
    with pytest.raises(CheckpointError, match="corrupt"):
        c.decode_state(stored, {})
    with pytest.raises(CheckpointError, match="does not have"):
        c.encode_state(state, {"b.weight": _SPARSE8})
