"""Models that take ``norm=`` and ``act=``."""

from .mlp import MLP, StackedMLP, gaussian_init_

__all__ = ["MLP", "StackedMLP", "gaussian_init_"]
