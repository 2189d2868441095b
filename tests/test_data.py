"""Data layer: IDX reader and its bad-file errors, MNIST/Fashion-MNIST/CIFAR-10 loaders on
generated files, mnist-5k's split, synthetic data, ``load_dataset`` and ``auto``.

Every test runs against a temporary cache (``$BNLAB_DATA``) and a temporary ``$HOME``; nothing
here touches the network or the real ``~/.cache``."""

from __future__ import annotations

import gzip
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab.data import (
    DATASET_NAMES,
    cache_dir,
    dataset_status,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_idx_pair,
    load_mnist,
    load_mnist5k,
    load_synthetic,
    read_idx,
    stratified_split,
    write_idx,
)
from bnlab.data import download as dl
from datagen import (
    CIFAR_LABEL_NAMES,
    IDX_NAMES,
    cifar_batch_bytes,
    make_cifar_tarball,
    make_idx_set,
)

pytestmark = pytest.mark.usefixtures("isolated_data")


# ---------------------------------------------------------------------------------------------
# IDX format


def test_idx_header_bytes_by_hand(tmp_path):
    arr = np.array([[1, 2, 3], [4, 5, 255]], dtype=np.uint8)
    path = write_idx(tmp_path / "a.idx", arr)
    # magic 00 00 08 02 (uint8, 2 dims), sizes 2 and 3 as big-endian uint32, then the 6 bytes
    expected = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 255])
    assert path.read_bytes() == expected
    back = read_idx(path)
    assert back.dtype == np.uint8 and back.shape == (2, 3)
    np.testing.assert_array_equal(back, arr)


def test_idx_big_endian_values_by_hand(tmp_path):
    # int16 258 = 0x0102 must be stored as 01 02; -2 as ff fe
    path = write_idx(tmp_path / "b.idx", np.array([258, -2], dtype=np.int16))
    assert path.read_bytes() == bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE])
    assert read_idx(path).tolist() == [258, -2]
    # a hand-written float32 file: 1.5 is 0x3FC00000 big-endian
    (tmp_path / "c.idx").write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0x3F, 0xC0, 0, 0]))
    assert read_idx(tmp_path / "c.idx").tolist() == [1.5]


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 5), (2, 1, 3, 2)])
def test_idx_round_trip(tmp_path, dtype, compress, shape):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal(shape) * 50).astype(dtype)
    path = write_idx(tmp_path / "x.idx", arr, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == shape
    assert back.dtype.isnative and back.flags.writeable
    np.testing.assert_array_equal(back, arr)


def test_idx_detects_gzip_by_content_not_name(tmp_path):
    arr = np.arange(10, dtype=np.uint8)
    gz_named_raw = write_idx(tmp_path / "raw-but-named.gz", arr, compress=False)
    raw_named_gz = write_idx(tmp_path / "gzipped-but-named.idx", arr, compress=True)
    np.testing.assert_array_equal(read_idx(gz_named_raw), arr)
    np.testing.assert_array_equal(read_idx(raw_named_gz), arr)


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(TypeError, match="uint16"):
        write_idx(tmp_path / "u16.idx", np.zeros(3, dtype=np.uint16))


def _good_idx(tmp_path) -> bytes:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    return write_idx(tmp_path / "good.idx", arr).read_bytes()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"\x12\x34" + b[2:], "wrong magic number 0x1234"),
        (lambda b: b[:2] + b"\x07" + b[3:], "unknown type code 0x07"),
        (lambda b: b[:3] + b"\x00" + b[4:], "ndim 0"),
        (lambda b: b[:-1], "truncated: header says shape (2, 3, 4) (24 data bytes"),
        (lambda b: b[:10], "truncated header"),
        (lambda b: b[:3], "truncated: 3 bytes"),
        (lambda b: b + b"\x00\x00", "2 trailing bytes"),
    ],
    ids=["magic", "type-code", "ndim", "truncated-data", "truncated-header", "tiny", "trailing"],
)
@pytest.mark.parametrize("compress", [False, True])
def test_idx_bad_files_name_file_and_problem(tmp_path, mutate, message, compress):
    bad = mutate(_good_idx(tmp_path))
    path = tmp_path / "bad-file.idx"
    path.write_bytes(gzip.compress(bad) if compress else bad)
    with pytest.raises(ValueError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_idx_header_sizes_whose_product_overflows_name_the_file(tmp_path):
    """Four sizes of 65536 multiply to 2**64: in int64 that wraps to 0, which matched the empty
    data and reached numpy's reshape error without the file's name."""
    path = tmp_path / "huge.idx"
    path.write_bytes(struct.pack(">HBB4I", 0, 0x08, 4, 65536, 65536, 65536, 65536))
    with pytest.raises(ValueError, match=r"huge\.idx: truncated: header says shape \(65536, "
                                         r"65536, 65536, 65536\) \(18446744073709551616 data"):
        read_idx(path)


def test_idx_truncated_gzip_stream(tmp_path):
    blob = gzip.compress(_good_idx(tmp_path) * 1)
    path = tmp_path / "cut.idx.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"cut\.idx\.gz: truncated gzip stream"):
        read_idx(path)


def test_idx_corrupt_gzip_checksum(tmp_path):
    blob = bytearray(gzip.compress(_good_idx(tmp_path)))
    blob[-8] ^= 0xFF  # the CRC32 in gzip's trailer
    path = tmp_path / "crc.idx.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"crc\.idx\.gz: corrupt gzip data"):
        read_idx(path)


def test_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.idx")


# ---------------------------------------------------------------------------------------------
# image/label pairs


def test_idx_pair_count_mismatch_names_both_files(tmp_path):
    images = write_idx(tmp_path / "imgs.gz", np.zeros((5, 28, 28), np.uint8))
    labels = write_idx(tmp_path / "labs.gz", np.zeros(4, np.uint8))
    with pytest.raises(ValueError) as info:
        load_idx_pair(images, labels)
    msg = str(info.value)
    assert "count mismatch" in msg and "5 images" in msg and "4 labels" in msg
    assert str(images) in msg and str(labels) in msg


def test_idx_pair_shape_and_label_checks(tmp_path):
    images = write_idx(tmp_path / "imgs.gz", np.zeros((3, 28, 28), np.uint8))
    labels = write_idx(tmp_path / "labs.gz", np.array([0, 9, 3], np.uint8))
    with pytest.raises(ValueError, match=r"labs\.gz: expected uint8 images"):
        load_idx_pair(labels, labels)
    with pytest.raises(ValueError, match=r"imgs\.gz: expected uint8 labels"):
        load_idx_pair(images, images)
    big = write_idx(tmp_path / "big.gz", np.array([0, 10, 3], np.uint8))
    with pytest.raises(ValueError, match=r"big\.gz: label 10 outside 0\.\.9"):
        load_idx_pair(images, big)
    x, y = load_idx_pair(images, labels)
    assert x.shape == (3, 28, 28) and y.tolist() == [0, 9, 3]


# ---------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST from the cache


def _check_idx_dataset(ds, arrays, name):
    assert ds.name == name
    xtr, ytr, xte, yte = (arrays[n] for n in IDX_NAMES)
    assert ds.x_train.shape == (len(ytr), 1, 28, 28) and ds.x_train.dtype == torch.float32
    assert ds.x_test.shape == (len(yte), 1, 28, 28)
    assert ds.y_train.dtype == torch.int64
    torch.testing.assert_close(ds.x_train[:, 0], torch.from_numpy(xtr).float() / 255.0)
    torch.testing.assert_close(ds.x_test[:, 0], torch.from_numpy(xte).float() / 255.0)
    assert ds.y_train.tolist() == ytr.tolist() and ds.y_test.tolist() == yte.tolist()
    # pixel 255 maps to exactly 1.0 and 0 to 0.0
    i = np.argwhere(xtr == 255)[0]
    assert ds.x_train[i[0], 0, i[1], i[2]].item() == 1.0


@pytest.mark.parametrize("compress", [True, False])
def test_load_mnist_from_cache(tmp_path, compress):
    arrays = make_idx_set(cache_dir() / "mnist", n_train=30, n_test=7, compress=compress)
    ds = load_mnist()
    _check_idx_dataset(ds, arrays, "mnist")
    assert ds.source == str(tmp_path / "cache" / "mnist")
    # the same through load_dataset and an explicit root
    other = tmp_path / "elsewhere"
    make_idx_set(other / "mnist", n_train=4, n_test=2, seed=5)
    assert len(load_dataset("mnist", root=other).y_train) == 4


def test_load_mnist_absent_says_how_to_get_it(tmp_path):
    (cache_dir() / "mnist").mkdir(parents=True)
    write_idx(cache_dir() / "mnist" / IDX_NAMES[0], np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError) as info:
        load_mnist()
    msg = str(info.value)
    assert str(tmp_path / "cache" / "mnist") in msg
    assert "bnlab data fetch mnist" in msg
    missing = re.search(r"missing (.*?)\. Run", msg).group(1).split(", ")
    assert missing == list(IDX_NAMES[1:])  # the images file is there


def test_load_mnist_count_mismatch_in_cache(tmp_path):
    d = cache_dir() / "mnist"
    make_idx_set(d, n_train=6, n_test=3)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="3 images but .*t10k-labels-idx1-ubyte.gz has 2 labels"):
        load_mnist()


def test_train_and_test_images_of_different_sizes_are_refused_at_load(tmp_path):
    d = cache_dir() / "mnist"
    make_idx_set(d, n_train=6, n_test=3)
    write_idx(d / "t10k-images-idx3-ubyte.gz", np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"mnist: the training images are 28x28 \(.*train-images"
                                         r".*\) but the test images are 32x32 \(.*t10k-images"):
        load_mnist()


def test_fashion_mnist_from_system_folder_and_cache_first(tmp_path, monkeypatch):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    sys_arrays = make_idx_set(system, n_train=8, n_test=4, seed=1)
    monkeypatch.setitem(dl.SYSTEM_DIRS, "fashion-mnist", (system,))
    ds = load_fashion_mnist()
    _check_idx_dataset(ds, sys_arrays, "fashion-mnist")
    assert ds.source == str(system) and ds.classes[0] == "T-shirt/top" and len(ds.classes) == 10
    cache_arrays = make_idx_set(cache_dir() / "fashion-mnist", n_train=5, n_test=2, seed=2)
    _check_idx_dataset(load_dataset("fashion-mnist"), cache_arrays, "fashion-mnist")


def test_fashion_mnist_absent_names_both_places(tmp_path, monkeypatch):
    monkeypatch.setitem(dl.SYSTEM_DIRS, "fashion-mnist", (tmp_path / "debian-dir",))
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist()
    msg = str(info.value)
    assert str(tmp_path / "cache" / "fashion-mnist") in msg
    assert f"nor in {tmp_path / 'debian-dir'}" in msg
    assert "bnlab data fetch fashion-mnist" in msg


# ---------------------------------------------------------------------------------------------
# CIFAR-10


@pytest.mark.parametrize(
    "protocol, bytes_keys", [("py2", False), (2, False), (2, True), (4, False), (4, True)]
)
def test_load_cifar10_tarball(tmp_path, protocol, bytes_keys):
    tarball = cache_dir() / "cifar10" / "cifar-10-python.tar.gz"
    xtr, ytr, xte, yte = make_cifar_tarball(
        tarball, n_per_batch=3, protocol=protocol, bytes_keys=bytes_keys
    )
    ds = load_dataset("cifar10")
    assert ds.name == "cifar10" and ds.source == str(tarball)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.y_train.tolist() == ytr.tolist() and ds.y_test.tolist() == yte.tolist()
    # row layout: 1024 red, then green, then blue; each plane row-major 32x32
    n, c, h, w = 7, 2, 5, 31
    assert ds.x_train[n, c, h, w].item() == pytest.approx(xtr[n, c * 1024 + h * 32 + w] / 255.0)
    assert ds.x_test[3, 1, 0, 0].item() == pytest.approx(xte[3, 1024] / 255.0)
    assert ds.classes == tuple(CIFAR_LABEL_NAMES)
    assert 0.0 <= ds.x_train.min().item() and ds.x_train.max().item() <= 1.0


def test_load_cifar10_extracted_folder_and_explicit_path(tmp_path):
    folder = cache_dir() / "cifar10" / "cifar-10-batches-py"
    xtr, ytr, _, _ = make_cifar_tarball(tmp_path / "t.tar.gz", n_per_batch=2, folder=folder)
    ds = load_cifar10()
    assert ds.source == str(folder) and ds.y_train.tolist() == ytr.tolist()
    ds2 = load_cifar10(path=tmp_path / "t.tar.gz")
    assert torch.equal(ds.x_train, ds2.x_train)


class _Boom:
    """Pickles as a call to os.system: a loader that executes it would create the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_cifar10_refuses_hostile_pickle(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"data": _Boom(marker), "labels": [0]})
    tarball = tmp_path / "evil.tar.gz"
    make_cifar_tarball(tarball, members={"data_batch_3": evil})
    with pytest.raises(ValueError, match=r"evil\.tar\.gz:data_batch_3: .*refusing to load global"):
        load_cifar10(path=tarball)
    assert not marker.exists()


def test_cifar10_bad_batches(tmp_path):
    mismatch = cifar_batch_bytes(np.zeros((3, 3072), np.uint8), [1, 2])
    t1 = tmp_path / "mismatch.tar.gz"
    make_cifar_tarball(t1, members={"test_batch": mismatch})
    with pytest.raises(ValueError, match=r"mismatch\.tar\.gz:test_batch: count mismatch, 3 images"):
        load_cifar10(path=t1)

    wrong_shape = cifar_batch_bytes(np.zeros((2, 1000), np.uint8), [1, 2])
    t2 = tmp_path / "shape.tar.gz"
    make_cifar_tarball(t2, members={"data_batch_1": wrong_shape})
    with pytest.raises(ValueError, match=r"data_batch_1: expected uint8 data of shape \(N, 3072\)"):
        load_cifar10(path=t2)

    t3 = tmp_path / "cut.tar.gz"
    make_cifar_tarball(t3)
    blob = t3.read_bytes()
    t3.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"cut\.tar\.gz: truncated or corrupt"):
        load_cifar10(path=t3)


def test_cifar10_missing_batch_and_absent(tmp_path):
    folder = tmp_path / "partial"
    make_cifar_tarball(tmp_path / "t.tar.gz", folder=folder)
    (folder / "data_batch_4").unlink()
    with pytest.raises(ValueError, match="missing CIFAR-10 batch.*data_batch_4"):
        load_cifar10(path=folder)
    with pytest.raises(FileNotFoundError, match="bnlab data fetch cifar10"):
        load_cifar10()


# ---------------------------------------------------------------------------------------------
# mnist-5k


@pytest.fixture(scope="module")
def mnist5k():
    return load_mnist5k()


def test_mnist5k_split_sizes_and_strata(mnist5k):
    ds = mnist5k
    assert ds.name == "mnist-5k"
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [100] * 10
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.min().item() == 0.0 and ds.x_train.max().item() == 1.0


def test_mnist5k_deterministic(mnist5k):
    again = load_mnist5k()
    assert torch.equal(mnist5k.x_train, again.x_train) and torch.equal(mnist5k.y_test, again.y_test)


def test_stratified_split_disjoint_complete_deterministic():
    labels = np.repeat(np.arange(4), [5, 7, 3, 9])
    tr, te = stratified_split(labels, test_per_class=2, seed=3)
    assert len(np.intersect1d(tr, te)) == 0
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[te]).tolist() == [2, 2, 2, 2]
    tr2, te2 = stratified_split(labels, test_per_class=2, seed=3)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)
    _, te3 = stratified_split(labels, test_per_class=2, seed=4)
    assert not np.array_equal(te, te3)


def test_mnist5k_train_test_disjoint(mnist5k):
    # no test image also appears in train (compare exact pixel rows via hashing)
    train = {bytes(r) for r in (mnist5k.x_train.view(4000, -1) * 255).round().byte().numpy()}
    test = [bytes(r) for r in (mnist5k.x_test.view(1000, -1) * 255).round().byte().numpy()]
    assert sum(r in train for r in test) == 0


# ---------------------------------------------------------------------------------------------
# auto, synthetic, names, cache location


def test_auto_falls_back_to_mnist5k_and_says_so(tmp_path):
    ds = load_dataset("auto")
    assert ds.name == "mnist-5k" and len(ds.y_train) == 4000
    assert "full MNIST is not in the cache" in ds.note
    assert str(tmp_path / "cache" / "mnist") in ds.note
    assert "bnlab data fetch mnist" in ds.note


def test_auto_picks_full_mnist_when_cached(tmp_path):
    arrays = make_idx_set(tmp_path / "cache" / "mnist", n_train=20, n_test=10)
    ds = load_dataset("auto")
    _check_idx_dataset(ds, arrays, "mnist")
    assert ds.note.startswith("dataset auto: full MNIST (20 train / 10 test)")
    assert "mnist-5k" in ds.note


def test_auto_incomplete_cache_is_mnist5k():
    d = cache_dir() / "mnist"
    make_idx_set(d)
    (d / IDX_NAMES[3]).unlink()
    assert load_dataset("auto").name == "mnist-5k"


def test_auto_with_corrupt_cached_mnist_raises_not_falls_back(tmp_path):
    d = cache_dir() / "mnist"
    make_idx_set(d)
    blob = (d / IDX_NAMES[2]).read_bytes()
    (d / IDX_NAMES[2]).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: truncated"):
        load_dataset("auto")


def test_dataset_status(tmp_path):
    status = dataset_status()
    assert set(status) == set(DATASET_NAMES)
    assert status["auto"].startswith("mnist-5k")
    assert "bnlab data fetch mnist" in status["mnist"]
    assert "bnlab data fetch cifar10" in status["cifar10"]
    assert status["mnist-5k"].endswith("mnist_5k.csv.gz")
    make_idx_set(tmp_path / "cache" / "mnist")
    make_cifar_tarball(tmp_path / "cache" / "cifar10" / "cifar-10-python.tar.gz")
    status = dataset_status()
    assert status["auto"] == "full MNIST (cached)"
    assert status["mnist"] == str(tmp_path / "cache" / "mnist")
    assert status["cifar10"].endswith("cifar10/cifar-10-python.tar.gz")


def test_synthetic_shapes_determinism_balance():
    a = load_synthetic(n_train=100, n_test=30, num_classes=5, seed=7)
    b = load_synthetic(n_train=100, n_test=30, num_classes=5, seed=7)
    c = load_synthetic(n_train=100, n_test=30, num_classes=5, seed=8)
    assert a.x_train.shape == (100, 1, 28, 28) and a.x_test.shape == (30, 1, 28, 28)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert torch.bincount(a.y_train).tolist() == [20] * 5
    assert torch.bincount(a.y_test).tolist() == [6] * 5
    assert 0.0 < a.x_train.min().item() and a.x_train.max().item() < 1.0
    assert a.num_classes == 5


def test_synthetic_is_learnable_by_nearest_centroid():
    ds = load_synthetic(n_train=500, n_test=200, seed=0)
    xtr, xte = ds.x_train.flatten(1), ds.x_test.flatten(1)
    centroids = torch.stack([xtr[ds.y_train == k].mean(0) for k in range(10)])
    pred = torch.cdist(xte, centroids).argmin(1)
    assert (pred == ds.y_test).float().mean().item() > 0.95
    shuffled = ds.y_test[torch.randperm(len(ds.y_test))]
    assert (pred == shuffled).float().mean().item() < 0.5


def test_synthetic_other_shapes_and_bad_args():
    ds = load_synthetic(n_train=6, n_test=3, num_classes=3, image_shape=(3, 4, 4))
    assert ds.x_train.shape == (6, 3, 4, 4)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        load_synthetic(num_classes=1)


def test_load_dataset_names():
    assert set(DATASET_NAMES) == {
        "auto",
        "mnist",
        "mnist-5k",
        "fashion-mnist",
        "cifar10",
        "synthetic",
    }
    assert load_dataset("synthetic", seed=3).name == "synthetic"
    assert load_dataset("MNIST5K").name == "mnist-5k"
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        load_dataset("svhn")


def test_cache_dir_precedence(tmp_path, monkeypatch):
    assert cache_dir() == tmp_path / "cache"
    assert cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("BNLAB_DATA")
    assert cache_dir() == tmp_path / "home" / ".cache" / "bnlab"


def test_struct_sanity_of_generated_mnist_headers(tmp_path):
    # the generated files carry MNIST's real magic numbers: 0x803 images, 0x801 labels
    make_idx_set(tmp_path / "m", n_train=2, n_test=1)
    raw = gzip.decompress((tmp_path / "m" / IDX_NAMES[0]).read_bytes())
    assert struct.unpack(">IIII", raw[:16]) == (0x803, 2, 28, 28)
    raw = gzip.decompress((tmp_path / "m" / IDX_NAMES[1]).read_bytes())
    assert struct.unpack(">II", raw[:8]) == (0x801, 2)
