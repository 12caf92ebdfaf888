"""dnnprune: make trained PyTorch networks smaller and faster while keeping their accuracy.

    import dnnprune
    model = dnnprune.load("vgg16.safetensors")
    model, report = dnnprune.prune(model, dnnprune.recipe.PruneSection(ratio=0.5))
    dnnprune.save(model, "vgg16-pruned.safetensors")

Every command has the shape `fn(model, section, *, data, device, observer) -> (model, report)`; the
commands are imported on first use, so `import dnnprune` stays light.
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from dnnprune._version import __version__
from dnnprune.errors import DnnpruneError

if TYPE_CHECKING:
    from dnnprune.checkpoint import CheckpointMeta, attach_meta, load, meta_of, save

# Imported on first use too (torch takes seconds to import): the console entry point can then catch a
# Ctrl-C during start-up and end in one line.
_CHECKPOINT = ("CheckpointMeta", "attach_meta", "load", "meta_of", "save")
_COMMANDS = {
    "train": "dnnprune.training",
    "analyze": "dnnprune.analysis",
    "prune": "dnnprune.pruning",
    "quantize": "dnnprune.quantization",
    "double_prune": "dnnprune.pruning",
    "score": "dnnprune.scoring",
    "export": "dnnprune.onnx_export",  # not dnnprune.export: a submodule of that name would shadow the function
}


def __getattr__(name: str) -> Any:
    if name in _CHECKPOINT:
        return getattr(import_module("dnnprune.checkpoint"), name)
    if name in _COMMANDS:
        return getattr(import_module(_COMMANDS[name]), name)
    if not name.startswith("_") and find_spec(f"dnnprune.{name}") is not None:  # `dnnprune.recipe.PruneSection`
        return import_module(f"dnnprune.{name}")
    raise AttributeError(f"module 'dnnprune' has no attribute {name!r}")


__all__ = ["CheckpointMeta", "DnnpruneError", "__version__", "attach_meta", "load", "meta_of", "save", *_COMMANDS]
