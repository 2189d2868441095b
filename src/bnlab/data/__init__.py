"""Data: IDX reader, data set loaders (MNIST, Fashion-MNIST, CIFAR-10, embedded mnist-5k,
synthetic), the cache and checked downloads. ``load_dataset(name)`` is the entry point;
``fetch(name)`` is what ``bnlab data fetch`` runs. See docs/data.md."""

from .datasets import (
    DATASET_NAMES,
    Dataset,
    dataset_status,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_idx_pair,
    load_mnist,
    load_mnist5k,
    load_synthetic,
    stratified_split,
)
from .download import (
    RESOURCES,
    ChecksumError,
    DownloadError,
    cache_dir,
    dataset_dir,
    download_file,
    fetch,
    locate,
    md5sum,
)
from .idx import read_idx, write_idx

__all__ = [
    "DATASET_NAMES",
    "RESOURCES",
    "ChecksumError",
    "Dataset",
    "DownloadError",
    "cache_dir",
    "dataset_dir",
    "dataset_status",
    "download_file",
    "fetch",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_idx_pair",
    "load_mnist",
    "load_mnist5k",
    "load_synthetic",
    "locate",
    "md5sum",
    "read_idx",
    "stratified_split",
    "write_idx",
]
