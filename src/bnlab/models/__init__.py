"""Models that take ``norm=`` and ``act=``."""

from .cnn import SmallCNN
from .inception import SmallInception
from .mlp import MLP, gaussian_init_
from .resnet import ResNetCifar, resnet20, resnet110

__all__ = ["MLP", "SmallCNN", "gaussian_init_", "ResNetCifar", "resnet20", "resnet110",
           "SmallInception"]  # fmt: skip
