"""bnlab normalization layers (``nn.Module``s owning state and mode) and the ``norm=`` registry
models are built from."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, name_layers
from .noisy import ScaleShiftNoise
from .recurrent import StepBatchNorm1d
from .registry import (
    LAYERS,
    NORMS,
    get_layer,
    make_norm,
    norm_names,
    register_norm,
)
from .whitening import BatchWhitening  # registers the "whiten" family

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchWhitening",
    "ScaleShiftNoise",
    "StepBatchNorm1d",
    "name_layers",
    "LAYERS",
    "NORMS",
    "get_layer",
    "make_norm",
    "norm_names",
    "register_norm",
]
