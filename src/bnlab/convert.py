"""Swap ``torch.nn.BatchNorm*`` <-> bnlab layers in any model, state and mode preserved.

The converted layer takes over the *same* ``Parameter`` and buffer objects as the layer it
replaces, so an optimizer built before the conversion keeps updating the right tensors, and
outputs and gradients are unchanged. Hooks registered on the replaced module are not carried over.
"""

from __future__ import annotations

from torch import nn

from .layers.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    _LazyBatchNorm,
    name_layers,
)

__all__ = ["convert"]

_TO_BNLAB: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.LazyBatchNorm1d: LazyBatchNorm1d,
    nn.LazyBatchNorm2d: LazyBatchNorm2d,
    nn.LazyBatchNorm3d: LazyBatchNorm3d,
}
_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in _TO_BNLAB.items()}
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _swap(old: nn.Module, cls: type[nn.Module]) -> nn.Module:
    lazy = isinstance(old, nn.modules.lazy.LazyModuleMixin)
    new = cls(
        *(() if lazy else (old.num_features,)),  # (a lazy layer's comes from its first input)
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
    if lazy:  # (the count of what it holds, if sized: torch's keeps 0 after a loaded state)
        new.num_features = old.num_features
        if isinstance(new, _LazyBatchNorm) and new.num_features == 0:
            new.num_features = new._loaded_features()
    new.train(old.training)
    return new


def _refusal(module: nn.Module, name: str, to: str) -> str | None:
    """Why ``module`` cannot be converted (None when it can)."""
    label = name or type(module).__name__
    if to != "torch":
        return None
    if getattr(module, "activation", None) is not None:  # torch's BN has no fused activation
        return (
            f"convert: layer '{label}' has activation={module.activation!r}, which torch's "
            "BatchNorm lacks"
        )
    if getattr(module, "frozen", False):  # nor a frozen mode
        return (
            f"convert: layer '{label}' is frozen (bnlab.freeze): torch's BatchNorm cannot use its "
            "population statistics in training mode nor stop updating them. Call "
            "bnlab.unfreeze(model) first, or keep bnlab's layers"
        )
    return None


def convert(model: nn.Module, to: str = "bnlab", *, sync: bool = False) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` and ``LazyBatchNorm1d/2d/3d`` in ``model`` by
    bnlab's (``to="bnlab"``) or every bnlab one by torch's (``to="torch"``); a lazy layer not yet
    sized stays lazy, to be sized by its first input. With ``sync=True`` (only
    with ``to="bnlab"``) every BatchNorm, torch's or bnlab's, becomes bnlab's
    :class:`~bnlab.SyncBatchNorm` instead (:func:`bnlab.convert_sync`).

    Children are replaced in place; the return value is the converted model (a new module when
    ``model`` itself is a BatchNorm layer). A layer registered at several places (the same object
    twice in an ``nn.Sequential``) is replaced by one new layer at all of them. Subclasses of
    either family (e.g. ``SyncBatchNorm``, bnlab variants) are left alone. What the other family
    cannot carry is refused, never dropped: with ``to="torch"``, ``ValueError`` naming the layer
    for a bnlab layer with a fused ``activation`` or frozen by :func:`bnlab.freeze`. Every layer
    is checked before the first is replaced, so a refused conversion leaves the model as it
    was.
    """
    if to not in ("bnlab", "torch"):
        raise ValueError(f"convert: to must be 'bnlab' or 'torch', got {to!r}")
    if sync:
        if to != "bnlab":
            raise ValueError(
                "convert: sync=True converts to bnlab's SyncBatchNorm (to='bnlab'); torch's "
                "torch.nn.SyncBatchNorm.convert_sync_batchnorm makes torch's, which run on GPUs"
            )
        from .layers.sync import convert_sync

        return convert_sync(model)
    table = _TO_BNLAB if to == "bnlab" else _TO_TORCH

    def walk(module: nn.Module, name: str, seen: set[int]) -> None:
        """Check every module (each object once), before anything is replaced."""
        if id(module) in seen:
            return
        seen.add(id(module))
        if type(module) in table:
            reason = _refusal(module, name, to)
            if reason:
                raise ValueError(reason)
        if type(module) in table:
            return
        for child_name, child in module._modules.items():
            if child is not None:
                walk(child, f"{name}.{child_name}" if name else child_name, seen)

    def visit(module: nn.Module, new: dict[int, nn.Module]) -> nn.Module:
        if id(module) in new:
            return new[id(module)]
        cls = table.get(type(module))
        new[id(module)] = _swap(module, cls) if cls is not None else module
        if cls is None:
            for child_name, child in list(module._modules.items()):
                if child is not None:
                    replaced = visit(child, new)
                    if replaced is not child:
                        module._modules[child_name] = replaced
        return new[id(module)]

    walk(model, "", set())
    out = visit(model, {})
    if to == "bnlab":
        name_layers(out)
    return out
