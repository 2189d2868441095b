"""Name -> normalization layer, used by models and configs (``norm=``).

Two tables:

* ``LAYERS``: layer classes by their own name (``"batchnorm2d"``); :func:`get_layer`.
* ``NORMS``: normalization *families* a model can be built with, by a short name (``"bn"``),
  each a factory ``factory(num_features, dims, **kwargs) -> nn.Module`` that picks the layer for
  the input's number of spatial dimensions (``dims=0`` for ``(N, C)`` activations of a dense
  layer, 1, 2 or 3 for ``(N, C, L)``, ``(N, C, H, W)``, ``(N, C, D, H, W)``). :func:`make_norm`
  is what models call; ``"none"`` (or None) means no normalization layer. Every class name of
  ``LAYERS`` is also a family, so ``norm="batchnorm2d"`` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["LAYERS", "NORMS", "get_layer", "register_norm", "make_norm", "norm_names"]

LAYERS: dict[str, type[nn.Module]] = {
    "batchnorm1d": BatchNorm1d,
    "batchnorm2d": BatchNorm2d,
    "batchnorm3d": BatchNorm3d,
}

NormFactory = Callable[..., nn.Module]
NORMS: dict[str, NormFactory] = {}


def get_layer(name: str) -> type[nn.Module]:
    """The layer class registered under ``name``; ValueError listing the known names otherwise."""
    try:
        return LAYERS[name.lower()]
    except (KeyError, AttributeError):
        known = ", ".join(sorted(LAYERS))
        raise ValueError(f"unknown normalization layer {name!r}; known: {known}") from None


def register_norm(name: str, factory: NormFactory) -> NormFactory:
    """Register a normalization family: ``factory(num_features, dims, **kwargs)``."""
    key = name.lower()
    if key in NORMS and NORMS[key] is not factory:
        raise ValueError(f"normalization {name!r} is already registered")
    NORMS[key] = factory
    return factory


def norm_names() -> list[str]:
    """The names ``norm=`` accepts: ``none`` and every registered family."""
    return ["none", *sorted(NORMS)]


def make_norm(name: str | None, num_features: int, dims: int = 2, **kwargs) -> nn.Module | None:
    """A normalization layer of family ``name`` for ``num_features`` channels of an input with
    ``dims`` spatial dimensions (0 for ``(N, C)``); None for ``name`` None or ``"none"``.
    ``kwargs`` go to the layer (e.g. ``activation="relu"`` for bnlab's fused BN+ReLU, which a
    family without it refuses with a TypeError naming the family)."""
    if name is None or name.lower() == "none":
        return None
    try:
        factory = NORMS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown normalization {name!r}; known: {', '.join(norm_names())}"
        ) from None
    try:
        return factory(num_features, dims, **kwargs)
    except TypeError as exc:
        raise TypeError(f"normalization {name!r}: {exc}") from None


def _batchnorm(num_features: int, dims: int, **kwargs) -> nn.Module:
    """Ioffe & Szegedy's BN: per activation for dense layers, per feature map otherwise."""
    if dims not in (0, 1, 2, 3):
        raise ValueError(f"bn: dims must be 0, 1, 2 or 3, got {dims!r}")
    cls = {0: BatchNorm1d, 1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}[dims]
    return cls(num_features, **kwargs)


register_norm("bn", _batchnorm)
for _name, _cls in LAYERS.items():
    register_norm(_name, lambda c, dims, _cls=_cls, **kw: _cls(c, **kw))
