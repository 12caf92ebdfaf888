"""Pruning: channels (structured, with plans, orders and accuracy-aware loops), whole layers (layers,
depth), network slimming and magnitude pruning (slimming, unstructured, double). `prune` and
`double_prune` are the library commands; channel coupling and surgery live in dnnprune.surgery.
The commands are imported on first use, so the algorithm modules import without them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {"prune": "dnnprune.pruning.command", "PruneReport": "dnnprune.pruning.command",
         "double_prune": "dnnprune.pruning.double", "DoublePruneReport": "dnnprune.pruning.double"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dnnprune.pruning' has no attribute {name!r}")


__all__ = list(_LAZY)
