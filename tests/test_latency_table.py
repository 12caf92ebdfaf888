"""The per-layer latency table: measured once per machine and runtime, then read from disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dnnprune.latency import LayerTable, layer_unit


def test_a_fused_table_times_conv_units_and_keeps_them_apart_from_eager(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    fused = LayerTable(batch=2, repeats=2, path=path, runtime="fused")
    eager = LayerTable(batch=2, repeats=2, path=path)
    assert fused.layer_ms(conv, 8, 4, (6, 6)) > 0 and eager.layer_ms(conv, 8, 4, (6, 6)) > 0
    assert len(fused.entries) == len(eager.entries) == 1
    assert next(iter(fused.entries)).startswith("fused|") and not next(iter(eager.entries)).startswith("fused|")
    fused.save()
    again = LayerTable(batch=2, repeats=2, path=path, runtime="fused")
    first = again.layer_ms(conv, 8, 4, (6, 6))
    assert again.measured == 0 and first == fused.entries[next(iter(fused.entries))]  # read back, not re-timed
    assert LayerTable(batch=4, repeats=2, path=path, runtime="fused").layer_ms(conv, 8, 4, (6, 6)) > 0  # batch is keyed


@pytest.mark.parametrize("layer, cin, cout, groups", [
    (torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), 6, 12, 1),
    (torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), 5, 5, 5),  # depthwise stays depthwise at any width
    (torch.nn.Conv1d(4, 4, 3, groups=2), 4, 6, 2),
])
def test_a_layer_unit_is_the_conv_with_its_norm_and_activation(layer: torch.nn.Conv2d, cin: int, cout: int,
                                                              groups: int) -> None:
    unit = layer_unit(layer, cin, cout)
    conv, norm, act = unit
    assert (conv.in_channels, conv.out_channels, conv.groups) == (cin, cout, groups)
    assert (conv.kernel_size, conv.stride, conv.padding) == (layer.kernel_size, layer.stride, layer.padding)
    assert norm.num_features == cout and isinstance(act, torch.nn.ReLU) and not unit.training


def test_a_linear_unit_is_the_linear_alone() -> None:
    unit = layer_unit(torch.nn.Linear(10, 3), 7, 2)
    assert isinstance(unit, torch.nn.Linear) and (unit.in_features, unit.out_features) == (7, 2)
