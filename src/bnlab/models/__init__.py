"""Models that take ``norm=`` and ``act=``."""

from .mlp import MLP

__all__ = ["MLP"]
