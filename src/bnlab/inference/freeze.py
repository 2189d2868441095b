"""Freezing: :func:`freeze` / :func:`unfreeze`.

A frozen bnlab BatchNorm layer applies the inference transform of Ioffe & Szegedy (2015),
section 3.1 and Algorithm 2 (population statistics in place of mini-batch ones) in training *and*
eval mode, and stops updating its statistics. The switch is the layer's ``frozen`` attribute, read
by :class:`bnlab.layers.batchnorm._BatchNorm`; torch's layers have no such switch, so freezing needs
bnlab layers (``bnlab.convert(model)``).
"""

from __future__ import annotations

from torch import nn

from ..layers.batchnorm import _BatchNorm
from ._common import _bn_layers

__all__ = ["freeze", "unfreeze"]


def _bnlab_layers_for(fn: str, model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    out = []
    for name, m in _bn_layers(model, fn):
        if not isinstance(m, _BatchNorm):
            raise TypeError(
                f"{fn}: layer '{name}' is a torch.nn {type(m).__name__}, whose train() cannot be "
                "overridden; convert the model first with bnlab.convert(model)"
            )
        out.append((name, m))
    return out


# names of the parameters freeze() switched off, per layer (an instance attribute, so that
# unfreeze() gives back exactly those and leaves the ones the user had switched off alone)
_SWITCHED_OFF = "_bnlab_frozen_params"


def freeze(model: nn.Module, params: bool = True) -> nn.Module:
    """Freeze every BatchNorm layer of ``model`` (bnlab layers; ``TypeError`` for torch ones).

    A frozen layer normalizes with its population statistics (Algorithm 2's inference transform,
    ``y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta``) in training *and* eval mode, never
    updates ``running_mean``/``running_var``/``num_batches_tracked``, and stays frozen across
    ``model.train()``; gradients still flow through it to earlier layers. With ``params=True``
    gamma and beta are frozen too (``requires_grad=False``, gradients cleared); the layer
    remembers which of them this switched off. The layer's repr shows ``frozen=True``. Every
    layer is checked before any is changed. Returns ``model``.
    """
    layers = _bnlab_layers_for("freeze", model)
    for name, m in layers:
        if m.running_mean is None:
            raise ValueError(
                f"freeze: layer '{name}' has track_running_stats=False, so it has no population "
                "statistics to freeze to"
            )
    for _, m in layers:
        m.frozen = True
        if params:
            off = set(vars(m).get(_SWITCHED_OFF, ()))
            for pname in ("weight", "bias"):
                p = getattr(m, pname)
                if p is None:
                    continue
                if p.requires_grad:
                    off.add(pname)
                    p.requires_grad_(False)
                p.grad = None
            vars(m)[_SWITCHED_OFF] = tuple(sorted(off))
    return model


def unfreeze(model: nn.Module, params: bool = True) -> nn.Module:
    """Undo :func:`freeze`: layers follow train/eval again; with ``params=True`` gamma and beta
    that :func:`freeze` switched off require gradients again. Parameters whose gradients were
    off before ``freeze`` (or that ``freeze(params=False)`` left alone) keep ``requires_grad``
    as it is. Returns ``model``."""
    for _, m in _bnlab_layers_for("unfreeze", model):
        m.frozen = False
        if params:
            for pname in vars(m).pop(_SWITCHED_OFF, ()):
                p = getattr(m, pname, None)
                if p is not None:
                    p.requires_grad_(True)
    return model
