"""Swap ``torch.nn.BatchNorm*`` <-> bnlab layers in any model, state and mode preserved.

The converted layer takes over the *same* ``Parameter`` and buffer objects as the layer it
replaces, so an optimizer built before the conversion keeps updating the right tensors, and
outputs and gradients are unchanged. Hooks registered on the replaced module are not carried over.
"""

from __future__ import annotations

from torch import nn

from .layers.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm, name_layers

__all__ = ["convert"]

_TO_BNLAB: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in _TO_BNLAB.items()}
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _swap(old: nn.Module, cls: type[nn.Module]) -> nn.Module:
    new = cls(
        old.num_features,
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        bias=getattr(old, "bias", None) is not None or not old.affine,
        device="meta",  # placeholders only: the old tensors are moved in below
    )
    for key in _STATE:
        value = getattr(old, key)
        if key in ("weight", "bias"):
            new._parameters[key] = value
        else:
            new._buffers[key] = value
    new.train(old.training)
    return new


def convert(model: nn.Module, to: str = "bnlab") -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``model`` by bnlab's (``to="bnlab"``) or
    every bnlab ``BatchNorm1d/2d/3d`` by torch's (``to="torch"``).

    Children are replaced in place; the return value is the converted model (a new module when
    ``model`` itself is a BatchNorm layer). Subclasses of either family (e.g. ``SyncBatchNorm``,
    bnlab variants) are left alone. Uninitialized lazy layers raise ``ValueError``.
    """
    if to not in ("bnlab", "torch"):
        raise ValueError(f"convert: to must be 'bnlab' or 'torch', got {to!r}")
    table = _TO_BNLAB if to == "bnlab" else _TO_TORCH

    def visit(module: nn.Module, name: str) -> nn.Module:
        lazy = isinstance(module, nn.modules.lazy.LazyModuleMixin)
        if lazy and module.has_uninitialized_params():
            raise ValueError(
                f"convert: lazy layer '{name or type(module).__name__}' is not initialized; "
                "run one forward pass first"
            )
        cls = table.get(type(module))
        if cls is not None and getattr(module, "activation", None) is not None:
            raise ValueError(  # torch's BatchNorm has no fused activation: refuse to drop it
                f"convert: layer '{name or type(module).__name__}' has "
                f"activation={module.activation!r}, which torch's BatchNorm lacks"
            )
        if cls is not None:
            return _swap(module, cls)
        for child_name, child in list(module.named_children()):
            new_child = visit(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module

    out = visit(model, "")
    if to == "bnlab":
        name_layers(out)
    return out


def is_bnlab_norm(module: nn.Module) -> bool:
    """True for bnlab BatchNorm layers and their variants."""
    return isinstance(module, _BatchNorm)
