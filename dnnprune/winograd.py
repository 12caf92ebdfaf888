"""Winograd F(2x2, 3x3) convolution for evaluation on small feature maps (Lavin & Gray 2016).

Each 2x2 output tile costs 16 multiplications per input/output channel pair instead of 36, and the
16 products become 16 large matrix products. On CPU this beats the direct (oneDNN) convolution where
feature maps are small and channels many (a CIFAR-style VGG's 8x8, 4x4 and 2x2 stages: 1.3-2x on this
machine), and loses where maps are large and channels few, so `eligible` only picks the former.
Results equal the direct convolution to float rounding (relative error ~1e-6), not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_PIXELS = 64  # feature maps up to 8x8
MIN_CHANNELS = 128  # below this the transforms cost more than the saved multiplications

_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def eligible(conv: nn.Module, x: torch.Tensor) -> bool:
    """A plain 3x3, stride-1, 'same' convolution on a small map with many channels, in float32 on CPU."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and x.dim() == 4 and x.dtype == torch.float32
            and x.device.type == "cpu" and x.shape[2] * x.shape[3] <= MAX_PIXELS
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS)


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) filters -> (16, C, K): G g G^T for each of the 16 tile positions."""
    g = torch.tensor(_G, dtype=weight.dtype, device=weight.device)
    u = torch.einsum("ai,kcij,bj->abck", g, weight, g)
    return u.reshape(16, weight.shape[1], weight.shape[0]).contiguous()


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Same as F.conv2d(x, w, bias, padding=1) with u = transform_weight(w); returns channels-last."""
    n, c, h, w = x.shape
    k = u.shape[2]
    th, tw = (h + 1) // 2, (w + 1) // 2
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + 2 * tw - w, 1, 1 + 2 * th - h))
    v = torch.empty(4, 4, n, th, tw, c, dtype=x.dtype, device=x.device)
    rows = _input_rows(padded, th)
    for a, row in enumerate(rows):  # B^T d B, rows then columns, on strided views of the padded map
        cols = [row[:, :, b:b + 2 * tw:2] for b in range(4)]
        torch.sub(cols[0], cols[2], out=v[a, 0])
        torch.add(cols[1], cols[2], out=v[a, 1])
        torch.sub(cols[2], cols[1], out=v[a, 2])
        torch.sub(cols[1], cols[3], out=v[a, 3])
    m = torch.bmm(v.view(16, n * th * tw, c), u).view(4, 4, n, th, tw, k)
    out = torch.empty(n, th, 2, tw, 2, k, dtype=x.dtype, device=x.device)
    for a, t in enumerate((m[0] + m[1] + m[2], m[1] - m[2] - m[3])):  # A^T m A
        torch.add(t[0] + t[1], t[2], out=out[:, :, a, :, 0])
        torch.sub(t[1] - t[2], t[3], out=out[:, :, a, :, 1])
    y = out.view(n, 2 * th, 2 * tw, k)[:, :h, :w]
    if bias is not None:
        y = y + bias
    return y.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def _input_rows(padded: torch.Tensor, th: int) -> list[torch.Tensor]:
    r = [padded[:, a:a + 2 * th:2] for a in range(4)]
    return [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]]


class WinogradConvs:
    """Runs eligible convolutions with Winograd, keeping each filter bank's transform until it changes.

    Pruning swaps in new weight tensors and restoring puts the old ones back, so the cache is keyed by
    the weight object itself (held, so its id cannot be reused) and its in-place version counter."""

    def __init__(self) -> None:
        self._transformed: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self.calls = 0

    def __call__(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        if not eligible(conv, x):
            return conv(x)
        self.calls += 1
        return conv3x3(x, self._weights(conv), conv.bias)

    def _weights(self, conv: nn.Conv2d) -> torch.Tensor:
        weight = conv.weight
        entry = self._transformed.get(id(conv))
        if entry is None or entry[0] is not weight or entry[1] != weight._version:
            entry = (weight, weight._version, transform_weight(weight.detach()))
            self._transformed[id(conv)] = entry
        return entry[2]
