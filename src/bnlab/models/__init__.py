"""Models that take ``norm=`` and ``act=``."""

from .mlp import MLP
from .resnet import ResNetCifar, resnet20, resnet110

__all__ = ["MLP", "ResNetCifar", "resnet20", "resnet110"]
