"""Datasets: the embedded MNIST 5,000-digit subset (and, later, IDX/CIFAR loaders and downloads)."""

from .datasets import Dataset, load_dataset, load_mnist5k

__all__ = ["Dataset", "load_dataset", "load_mnist5k"]
