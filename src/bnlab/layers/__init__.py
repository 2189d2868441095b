"""bnlab normalization layers (``nn.Module``s owning state and mode) and the ``norm=`` registry
models are built from."""

from .batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    name_layers,
)
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
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
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, renorm_schedule
from .sync import SyncBatchNorm, convert_sync
from .whitening import BatchWhitening  # registers the "whiten" family

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "BatchWhitening",
    "ScaleShiftNoise",
    "StepBatchNorm1d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "SyncBatchNorm",
    "convert_sync",
    "renorm_schedule",
    "name_layers",
    "LAYERS",
    "NORMS",
    "get_layer",
    "make_norm",
    "norm_names",
    "register_norm",
]
