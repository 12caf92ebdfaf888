"""Layer patterns: globs, types and containers take what they can; only a layer named exactly may be refused."""

from __future__ import annotations

import pytest
from torch import nn

from dnnprune.errors import RecipeError
from dnnprune.patterns import select_layers

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # what quantize takes


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.head = nn.Sequential(nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 3))


@pytest.mark.parametrize("patterns, expected", [
    (["*"], ["features.0", "features.3", "head.2"]),
    (["features.*"], ["features.0", "features.3"]),
    (["features"], ["features.0", "features.3"]),  # a container: the layers inside it
    (["head"], ["head.2"]),
    (["type:Conv2d"], ["features.0", "features.3"]),
    (["*.0", "head.?"], ["features.0", "head.2"]),
    (["features.3"], ["features.3"]),
])
def test_globs_and_containers_skip_what_cannot_be_handled(patterns: list[str], expected: list[str]) -> None:
    assert select_layers(_Mixed(), patterns, supported=_LAYERS) == expected


def test_without_supported_types_every_layer_with_weights_is_a_candidate() -> None:
    assert select_layers(_Mixed(), ["*"]) == ["embed", "features.0", "features.1", "features.3", "head.1", "head.2"]


@pytest.mark.parametrize("pattern, fragment", [
    ("features.1", r"layer 'features.1' is a BatchNorm2d, which cannot be handled here"),
    ("embed", r"layer 'embed' is a Embedding"),
])
def test_a_layer_named_exactly_must_be_supported(pattern: str, fragment: str) -> None:
    with pytest.raises(RecipeError, match=fragment) as raised:
        select_layers(_Mixed(), ["features", pattern], supported=_LAYERS, what="quantize layer pattern")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("pattern, fragment", [
    ("type:BatchNorm2d", r"'type:BatchNorm2d' matches only layers that cannot be handled here \(features.1 \(BatchNorm2d\)\)"),
    ("head.1", r"layer 'head.1' is a LayerNorm"),
    ("features.[12]", r"matches only layers that cannot be handled here \(features.1 \(BatchNorm2d\)\)"),
    ("classifier.*", r"'classifier.\*' matches no layer; .*candidates here: features.0 \(Conv2d\)"),
    ("type:", "names no type"),
])
def test_a_pattern_that_picks_nothing_is_an_error(pattern: str, fragment: str) -> None:
    with pytest.raises(RecipeError, match=fragment):
        select_layers(_Mixed(), [pattern], supported=_LAYERS)


def test_within_restricts_the_candidates() -> None:
    assert select_layers(_Mixed(), ["*"], within=["features.3", "head.2"]) == ["features.3", "head.2"]
    with pytest.raises(RecipeError, match="'embed' matches no layer"):
        select_layers(_Mixed(), ["embed"], within=["features.3"])
