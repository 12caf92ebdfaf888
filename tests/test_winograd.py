"""Winograd F(2x2, 3x3): equal to the direct convolution to float rounding, used only where it pays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dnnprune.winograd import WinogradConvs, conv3x3, eligible, transform_weight


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 5), (4, 4), (7, 7), (8, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_direct_convolution(size: tuple[int, int], bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, *size, generator=generator)
    w = torch.randn(7, 5, 3, 3, generator=generator)
    b = torch.randn(7, generator=generator) if bias else None
    got = conv3x3(x, transform_weight(w), b)
    expected = F.conv2d(x, w, b, padding=1)
    assert got.shape == expected.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_channels_last_input_gives_the_same_result() -> None:
    x = torch.randn(2, 4, 4, 4)
    w = torch.randn(6, 4, 3, 3)
    u = transform_weight(w)
    torch.testing.assert_close(conv3x3(x.contiguous(memory_format=torch.channels_last), u, None),
                               conv3x3(x, u, None), rtol=0, atol=0)


def test_only_small_maps_with_many_channels_are_eligible() -> None:
    wide = nn.Conv2d(128, 128, 3, padding=1)
    assert eligible(wide, torch.zeros(1, 128, 8, 8))
    assert not eligible(wide, torch.zeros(1, 128, 16, 16)), "large map: direct convolution is faster"
    assert not eligible(nn.Conv2d(64, 128, 3, padding=1), torch.zeros(1, 64, 4, 4)), "few channels"
    assert not eligible(nn.Conv2d(128, 128, 3, padding=1, stride=2), torch.zeros(1, 128, 4, 4))
    assert not eligible(nn.Conv2d(128, 128, 3, padding=0), torch.zeros(1, 128, 4, 4))
    assert not eligible(nn.Conv2d(128, 128, 3, padding=1, groups=2), torch.zeros(1, 128, 4, 4))
    assert not eligible(nn.Conv2d(128, 128, 1), torch.zeros(1, 128, 4, 4))
    assert not eligible(wide, torch.zeros(1, 128, 4, 4, dtype=torch.float64))


def test_cached_transform_follows_weight_replacement_and_in_place_edits() -> None:
    conv = nn.Conv2d(128, 128, 3, padding=1).eval()
    x = torch.randn(2, 128, 4, 4)
    convs = WinogradConvs()
    with torch.no_grad():
        torch.testing.assert_close(convs(conv, x), conv(x), rtol=1e-4, atol=1e-4)
        conv.weight.mul_(2)  # in place: same object, new version
        torch.testing.assert_close(convs(conv, x), conv(x), rtol=1e-4, atol=1e-4)
        conv.weight = nn.Parameter(torch.randn_like(conv.weight))  # replaced, as pruning does
        torch.testing.assert_close(convs(conv, x), conv(x), rtol=1e-4, atol=1e-4)
        small = nn.Conv2d(3, 4, 3, padding=1)
        assert torch.equal(convs(small, x[:1, :3]), small(x[:1, :3]))
    assert convs.calls == 3, "the ineligible conv ran directly"
