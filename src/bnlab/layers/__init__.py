"""bnlab normalization layers (``nn.Module``s owning state and mode) and the ``norm=`` registry
models are built from."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, name_layers
from .noisy import ScaleShiftNoise
from .registry import (
    LAYERS,
    NORMS,
    get_layer,
    make_norm,
    norm_names,
    register_norm,
)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "ScaleShiftNoise",
    "name_layers",
    "LAYERS",
    "NORMS",
    "get_layer",
    "make_norm",
    "norm_names",
    "register_norm",
]
