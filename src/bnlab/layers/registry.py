"""Name -> class registry of bnlab normalization layers, used by models and configs (``norm=``)."""

from __future__ import annotations

from torch import nn

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["LAYERS", "get_layer", "register_layer"]

LAYERS: dict[str, type[nn.Module]] = {
    "batchnorm1d": BatchNorm1d,
    "batchnorm2d": BatchNorm2d,
    "batchnorm3d": BatchNorm3d,
}


def register_layer(name: str, cls: type[nn.Module]) -> type[nn.Module]:
    """Register ``cls`` under ``name`` (lower case). Returns cls, so it works as a decorator."""
    key = name.lower()
    if key in LAYERS and LAYERS[key] is not cls:
        raise ValueError(f"layer name {name!r} is already registered to {LAYERS[key].__name__}")
    LAYERS[key] = cls
    return cls


def get_layer(name: str) -> type[nn.Module]:
    """The layer class registered under ``name``; ValueError listing the known names otherwise."""
    try:
        return LAYERS[name.lower()]
    except KeyError:
        known = ", ".join(sorted(LAYERS))
        raise ValueError(f"unknown normalization layer {name!r}; known: {known}") from None
