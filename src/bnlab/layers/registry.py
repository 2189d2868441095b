"""Name -> normalization layer, used by models and configs (``norm=``).

Two tables:

* ``LAYERS``: layer classes by their own name (``"batchnorm2d"``); :func:`get_layer`.
* ``NORMS``: normalization *families* a model can be built with, by a short name (``"bn"``),
  each a factory ``factory(num_features, dims, **kwargs) -> nn.Module`` that picks the layer for
  the input's number of spatial dimensions (``dims=0`` for ``(N, C)`` activations of a dense
  layer, 1, 2 or 3 for ``(N, C, L)``, ``(N, C, H, W)``, ``(N, C, D, H, W)``). :func:`make_norm`
  is what models call; ``"none"`` (or None) means no normalization layer. Every class name of
  ``LAYERS`` is also a family, so ``norm="batchnorm2d"`` keeps working.

Families: ``"bn"`` (Ioffe & Szegedy 2015), ``"brn"`` (batch renormalization, Ioffe 2017),
``"ghost"`` (ghost BN, Hoffer et al. 2017; ``virtual_batch_size=``, default 32), ``"sync"``
(synchronized BN over ``torch.distributed``), and the batch-independent ``"gn"`` and ``"ln"``,
which are torch's own layers: ``"gn"`` is ``torch.nn.GroupNorm`` (Wu & He 2018) and ``"ln"``
layer normalization (Ba et al. 2016): ``torch.nn.LayerNorm(C)`` for ``(N, C)`` activations and,
for feature maps, ``torch.nn.GroupNorm(1, C)``, which normalizes each example over all its
channels and positions with a per-channel scale and shift (the "LN" of the Group Norm paper,
section 3.1; ``nn.LayerNorm`` would need the spatial size at construction and learn one scale
per position).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .sync import SyncBatchNorm

__all__ = [
    "LAYERS",
    "NORMS",
    "get_layer",
    "register_norm",
    "make_norm",
    "norm_names",
    "default_groups",
]

LAYERS: dict[str, type[nn.Module]] = {
    "batchnorm1d": BatchNorm1d,
    "batchnorm2d": BatchNorm2d,
    "batchnorm3d": BatchNorm3d,
    "batchrenorm1d": BatchRenorm1d,
    "batchrenorm2d": BatchRenorm2d,
    "batchrenorm3d": BatchRenorm3d,
    "ghostbatchnorm1d": GhostBatchNorm1d,
    "ghostbatchnorm2d": GhostBatchNorm2d,
    "ghostbatchnorm3d": GhostBatchNorm3d,
    "syncbatchnorm": SyncBatchNorm,
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


def _by_dims(family: str, classes: tuple[type[nn.Module], ...]) -> NormFactory:
    """A family whose layer class depends on the spatial dimensions: ``classes`` are the
    1d, 2d and 3d layers (``(N, C)`` and ``(N, C, L)`` take the 1d one)."""

    def factory(num_features: int, dims: int, **kwargs) -> nn.Module:
        if dims not in (0, 1, 2, 3):
            raise ValueError(f"{family}: dims must be 0, 1, 2 or 3, got {dims!r}")
        return classes[max(dims, 1) - 1](num_features, **kwargs)

    factory.__doc__ = f"norm={family!r}: {', '.join(c.__name__ for c in classes)} by dims."
    return factory


def default_groups(num_channels: int, groups: int = 32, min_channels: int = 2) -> int:
    """The number of groups ``"gn"`` uses for ``num_channels`` channels: the Group Norm
    paper's 32 (Wu & He 2018, section 4.1), reduced to the largest divisor of the channel
    count that leaves at least ``min_channels`` channels per group (one channel per group
    would be instance normalization)."""
    best = 1
    for g in range(1, min(groups, num_channels // min_channels) + 1):
        if num_channels % g == 0:
            best = g
    return best


def _group_norm(num_features: int, dims: int, groups: int | None = None, eps: float = 1e-5,
                affine: bool = True) -> nn.Module:  # fmt: skip
    """norm="gn": ``torch.nn.GroupNorm(groups, C)``; groups default to :func:`default_groups`."""
    if groups is None:
        groups = default_groups(num_features)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"gn: groups must be a positive int, got {groups!r}")
    if num_features % groups:
        raise ValueError(
            f"gn: {num_features} channels cannot be split into {groups} groups "
            f"(gcd: {math.gcd(num_features, groups)})"
        )
    return nn.GroupNorm(groups, num_features, eps=eps, affine=affine)


def _layer_norm(num_features: int, dims: int, eps: float = 1e-5, affine: bool = True
                ) -> nn.Module:  # fmt: skip
    """norm="ln": ``torch.nn.LayerNorm(C)`` for (N, C); ``torch.nn.GroupNorm(1, C)`` (per-example
    statistics over channels and positions, per-channel scale and shift) for feature maps."""
    if dims == 0:
        return nn.LayerNorm(num_features, eps=eps, elementwise_affine=affine)
    return nn.GroupNorm(1, num_features, eps=eps, affine=affine)


def _sync(num_features: int, dims: int, **kwargs) -> nn.Module:
    """norm="sync": :class:`SyncBatchNorm` (one class for every input rank)."""
    return SyncBatchNorm(num_features, **kwargs)


register_norm("bn", _by_dims("bn", (BatchNorm1d, BatchNorm2d, BatchNorm3d)))
register_norm("brn", _by_dims("brn", (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d)))
register_norm("ghost", _by_dims("ghost", (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d)))
register_norm("sync", _sync)
register_norm("gn", _group_norm)
register_norm("ln", _layer_norm)
for _name, _cls in LAYERS.items():
    register_norm(_name, lambda c, dims, _cls=_cls, **kw: _cls(c, **kw))
