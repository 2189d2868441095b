"""Models that take ``norm=`` and ``act=``."""

from .mlp import MLP, StackedMLP, gaussian_init_
from .resnet import ResNet20

__all__ = ["MLP", "StackedMLP", "gaussian_init_", "ResNet20"]
