"""Domain errors: each one becomes a single red line and exit code 2 at the CLI."""


class DnnpruneError(Exception):
    """A user-facing problem: the message names the problem and the fix."""


class RecipeError(DnnpruneError):
    """The recipe (or an option overriding it) is invalid."""


class CheckpointError(DnnpruneError):
    """A checkpoint is missing, corrupt, a pickle, or not a dnnprune file."""


class DatasetError(DnnpruneError):
    """A dataset cannot be found or read."""


class ModelError(DnnpruneError):
    """An unknown architecture or bad constructor arguments."""


class PruningError(DnnpruneError):
    """A pruning plan cannot be applied (empty layer, unmatched pattern, ...)."""


class OutputError(DnnpruneError):
    """An output path cannot be written (exists without --force, is the input, ...)."""
