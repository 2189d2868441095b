"""Models that take ``norm=`` and ``act=``."""

from .mlp import MLP
from .resnet import ResNet20

__all__ = ["MLP", "ResNet20"]
