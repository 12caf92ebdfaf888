"""Structured pruning: plans (structured), orders and the accuracy-aware loop (schedule), and `prune`,
the one entry point the CLI calls. Channel coupling and surgery live in dnnprune.surgery."""

from dnnprune.pruning.command import PruneReport, prune

__all__ = ["PruneReport", "prune"]
