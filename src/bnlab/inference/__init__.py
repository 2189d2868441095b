"""Batch Normalization at inference (the package is split by subject in the next commits)."""

from .population import (
    ChannelAffine,
    LayerDiagnosis,
    diagnose,
    fold,
    freeze,
    recompute_population_stats,
    unfreeze,
)

__all__ = [
    "ChannelAffine",
    "LayerDiagnosis",
    "diagnose",
    "fold",
    "freeze",
    "recompute_population_stats",
    "unfreeze",
]
