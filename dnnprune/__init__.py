"""dnnprune: make trained PyTorch networks smaller and faster while keeping their accuracy."""

__version__ = "0.1.0"

from dnnprune.checkpoint import CheckpointMeta, load, meta_of, save  # noqa: E402
from dnnprune.errors import DnnpruneError  # noqa: E402

__all__ = ["CheckpointMeta", "DnnpruneError", "__version__", "load", "meta_of", "save"]
