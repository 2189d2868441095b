"""bnlab: Batch Normalization (Ioffe & Szegedy, 2015) on PyTorch.

The layer (``BatchNorm1d/2d/3d``, drop-in for ``torch.nn``) and its variants for small,
non-i.i.d. and distributed batches (``BatchRenorm*d``, ``GhostBatchNorm*d``, ``SyncBatchNorm``),
the functional transform and its hand-written backward (:mod:`bnlab.functional`), and
conversion of existing models (:func:`convert`, :func:`convert_sync`); inference and state
(:mod:`bnlab.inference`: population statistics, folding, freezing, diagnosis;
:mod:`bnlab.checkpoint`: atomic, exactly resumable checkpoints). On the CPU the layers run fused
Numba kernels (:mod:`bnlab.kernels`) where they apply; :func:`set_backend` selects "auto",
"fused" or "reference" (and :func:`set_compile_form` how ``torch.compile`` sees them: bnlab's
operators or standard ops). The layers are subclasses of torch's BatchNorm layers, and their calls
are PyTorch operators (:mod:`bnlab.ops`) that ``torch.compile``, ``torch.export``, ONNX,
TorchScript, fx and ``torch.func`` see. Training on several processes: :mod:`bnlab.distributed`.
"""

from . import errors, fusers, ops  # noqa: F401  (ops: registers the torch.ops.bnlab operators)
from .autograd import batch_norm, batch_norm_eval, batch_norm_train, patch_functional
from .backend import get_backend, set_backend, use_backend
from .checkpoint import load_checkpoint, save_checkpoint
from .convert import convert
from .inference import (
    ChannelAffine,
    LayerDiagnosis,
    diagnose,
    fold,
    freeze,
    recompute_population_stats,
    unfreeze,
)
from .layers import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    BatchWhitening,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    StepBatchNorm1d,
    SyncBatchNorm,
    convert_sync,
    get_layer,
    name_layers,
    renorm_schedule,
)
from .ops import compile_form, decompositions, get_compile_form, set_compile_form

fusers.register()  # torch.ao.quantization.fuse_modules finds bnlab's layers

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "BatchWhitening",
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
    "batch_norm",
    "patch_functional",
    "batch_norm_train",
    "batch_norm_eval",
    "convert",
    "decompositions",
    "set_compile_form",
    "get_compile_form",
    "compile_form",
    "get_backend",
    "set_backend",
    "use_backend",
    "get_layer",
    "name_layers",
    "recompute_population_stats",
    "fold",
    "freeze",
    "unfreeze",
    "diagnose",
    "ChannelAffine",
    "LayerDiagnosis",
    "save_checkpoint",
    "load_checkpoint",
    "__version__",
]
