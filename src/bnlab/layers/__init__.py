"""bnlab normalization layers (``nn.Module``s owning state and mode)."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, name_layers
from .registry import LAYERS, get_layer, register_layer

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "name_layers",
    "LAYERS",
    "get_layer",
    "register_layer",
]
