"""Downloads against a local HTTP server on 127.0.0.1: fetch into the cache, checksums, atomic
replacement, truncated and corrupted transfers, HTTP errors, timeouts, and the offline error.

No test contacts any host but 127.0.0.1; the official checksums in ``RESOURCES`` are swapped for
those of the generated files with ``monkeypatch``."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from bnlab.data import (
    RESOURCES,
    ChecksumError,
    DownloadError,
    download_file,
    fetch,
    load_dataset,
    load_mnist,
    md5sum,
)
from bnlab.data import download as dl
from bnlab.data.download import RemoteFile, Resource
from datagen import IDX_NAMES, LocalServer, make_cifar_tarball, make_idx_set

pytestmark = pytest.mark.usefixtures("isolated_data")


@pytest.fixture
def server():
    with LocalServer() as s:
        yield s


def _closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if p.name.endswith(".part")]


@pytest.fixture
def served_mnist(tmp_path, server, monkeypatch):
    """Generated MNIST files on the server under /mnist/, with RESOURCES['mnist'] listing their
    MD5s; returns (arrays, {name: bytes})."""
    src = tmp_path / "origin" / "mnist"
    arrays = make_idx_set(src, n_train=9, n_test=4, seed=3)
    blobs = {n: (src / n).read_bytes() for n in IDX_NAMES}
    for n, b in blobs.items():
        server.routes[f"/mnist/{n}"] = b
    resource = Resource(
        "mnist",
        "mnist",
        RESOURCES["mnist"].base_urls,
        tuple(RemoteFile(n, md5sum(src / n)) for n in IDX_NAMES),
    )
    monkeypatch.setitem(dl.RESOURCES, "mnist", resource)
    return arrays, blobs


def test_official_table_is_complete():
    # the published MD5s: 4 MNIST files, 4 Fashion-MNIST files, the CIFAR-10 python tarball
    assert [f.name for f in RESOURCES["mnist"].files] == list(IDX_NAMES)
    assert [f.name for f in RESOURCES["fashion-mnist"].files] == list(IDX_NAMES)
    assert [f.name for f in RESOURCES["cifar10"].files] == ["cifar-10-python.tar.gz"]
    assert RESOURCES["mnist"].file("train-images-idx3-ubyte.gz").md5 == (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    )
    assert RESOURCES["cifar10"].files[0].md5 == "c58f30108f718f92721af3b95e74349a"
    for r in RESOURCES.values():
        assert all(len(f.md5) == 32 and int(f.md5, 16) >= 0 for f in r.files)
        assert all(u.endswith("/") and u.startswith(("http://", "https://")) for u in r.base_urls)


def test_fetch_mnist_from_mirror_then_load(tmp_path, server, served_mnist):
    arrays, blobs = served_mnist
    directory = fetch("mnist", mirror=server.url, progress=False)
    assert directory == tmp_path / "cache" / "mnist"
    for n, b in blobs.items():
        assert (directory / n).read_bytes() == b
    assert _no_temp_files(directory)
    ds = load_mnist()
    assert ds.y_train.tolist() == arrays[IDX_NAMES[1]].tolist()
    # a second fetch finds good files and downloads nothing
    before = dict(server.hits)
    assert fetch("mnist", mirror=server.url, progress=False) == directory
    assert server.hits == before
    assert all(server.hits[f"/mnist/{n}"] == 1 for n in IDX_NAMES)


def test_fetch_uses_env_mirror_and_progress_bar(
    tmp_path, server, served_mnist, monkeypatch, capsys
):
    monkeypatch.setenv("BNLAB_DATA_MIRROR", server.url + "/")
    fetch("mnist", progress=True)
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(IDX_NAMES)
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err  # tqdm's description


def test_load_dataset_download_flag(server, served_mnist):
    arrays, _ = served_mnist
    with pytest.raises(FileNotFoundError):
        load_dataset("mnist")
    ds = load_dataset("mnist", download=True, mirror=server.url, progress=False)
    assert ds.y_test.tolist() == arrays[IDX_NAMES[3]].tolist()
    assert load_dataset("auto").name == "mnist"  # now cached


def test_fetch_falls_back_to_next_base_url(tmp_path, server, served_mnist, monkeypatch):
    resource = dl.RESOURCES["mnist"]
    dead = f"http://127.0.0.1:{_closed_port()}/x/"
    monkeypatch.setitem(
        dl.RESOURCES,
        "mnist",
        Resource("mnist", "mnist", (dead, server.url + "/mnist/"), resource.files),
    )
    fetch("mnist", progress=False)
    assert len(list((tmp_path / "cache" / "mnist").iterdir())) == 4


def test_fetch_replaces_a_stale_file_only_with_a_good_one(tmp_path, server, served_mnist):
    _, blobs = served_mnist
    d = tmp_path / "cache" / "mnist"
    d.mkdir(parents=True)
    name = IDX_NAMES[1]
    (d / name).write_bytes(b"stale copy")
    # the server sends a corrupted file (same length, one byte flipped)
    good = blobs[name]
    server.routes[f"/mnist/{name}"] = good[:20] + bytes([good[20] ^ 0xFF]) + good[21:]
    with pytest.raises(ChecksumError) as info:
        fetch("mnist", mirror=server.url, progress=False)
    msg = str(info.value)
    assert name in msg and "checksum mismatch" in msg and server.url in msg
    assert (d / name).read_bytes() == b"stale copy"
    assert _no_temp_files(d)
    # once the server is fixed the stale file is replaced
    server.routes[f"/mnist/{name}"] = good
    fetch("mnist", mirror=server.url, progress=False)
    assert (d / name).read_bytes() == good


def test_checksum_mismatch_keeps_good_file(tmp_path, server):
    good = b"the good bytes" * 100
    dest = tmp_path / "dl" / "file.bin"
    dest.parent.mkdir()
    dest.write_bytes(good)
    server.routes["/file.bin"] = b"the evil bytes" * 100
    with pytest.raises(
        ChecksumError,
        match=r"file\.bin from http://127\.0\.0\.1:\d+/file\.bin: "
        r"checksum mismatch",
    ):
        download_file(server.url + "/file.bin", dest, md5sum(dest), progress=False)
    assert dest.read_bytes() == good
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]


def test_truncated_download_keeps_good_file(tmp_path, server):
    body = bytes(range(256)) * 400  # 102,400 bytes
    server.routes["/big.bin"] = body
    server.truncate["/big.bin"] = 5000
    dest = tmp_path / "dl" / "big.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"previous good copy")
    import hashlib

    with pytest.raises(DownloadError, match=r"big\.bin: truncated, .*5000 of 102400 bytes"):
        download_file(server.url + "/big.bin", dest, hashlib.md5(body).hexdigest(), progress=False)
    assert dest.read_bytes() == b"previous good copy"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["big.bin"]
    # the same URL served whole succeeds and replaces the file
    del server.truncate["/big.bin"]
    download_file(server.url + "/big.bin", dest, hashlib.md5(body).hexdigest(), progress=False)
    assert dest.read_bytes() == body


def test_truncated_fetch_leaves_no_file(tmp_path, server, served_mnist):
    name = IDX_NAMES[0]
    server.truncate[f"/mnist/{name}"] = 100
    with pytest.raises(DownloadError, match="truncated"):
        fetch("mnist", mirror=server.url, progress=False)
    d = tmp_path / "cache" / "mnist"
    assert not (d / name).exists() and _no_temp_files(d)


def test_http_error_names_url(tmp_path, server):
    with pytest.raises(
        DownloadError,
        match=r"cannot download http://127\.0\.0\.1:\d+/missing: "
        r"HTTP 404",
    ):
        download_file(server.url + "/missing", tmp_path / "m", "0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_offline_error_names_url_and_how_to_place_by_hand(tmp_path):
    port = _closed_port()
    with pytest.raises(DownloadError) as info:
        fetch("mnist", mirror=f"http://127.0.0.1:{port}", progress=False, timeout=2)
    msg = str(info.value)
    assert f"http://127.0.0.1:{port}/mnist/train-images-idx3-ubyte.gz" in msg
    assert "offline" in msg
    assert str(tmp_path / "cache" / "mnist" / "train-images-idx3-ubyte.gz") in msg
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg  # the checksum to check a copy against
    assert isinstance(info.value, OSError)
    assert _no_temp_files(tmp_path / "cache")


def test_stalled_server_times_out(tmp_path, server):
    server.routes["/slow"] = b"x"
    server.stall["/slow"] = 3.0
    with pytest.raises(DownloadError, match=r"cannot download .*/slow: .*timed out"):
        download_file(
            server.url + "/slow", tmp_path / "slow", "0" * 32, timeout=0.3, progress=False
        )
    assert list(tmp_path.iterdir()) == []


def test_fetch_cifar10_then_load(tmp_path, server, monkeypatch):
    origin = tmp_path / "origin" / "cifar-10-python.tar.gz"
    xtr, ytr, _, _ = make_cifar_tarball(origin, n_per_batch=2)
    server.routes["/cifar10/cifar-10-python.tar.gz"] = origin.read_bytes()
    monkeypatch.setitem(
        dl.RESOURCES,
        "cifar10",
        Resource(
            "cifar10",
            "cifar10",
            RESOURCES["cifar10"].base_urls,
            (RemoteFile("cifar-10-python.tar.gz", md5sum(origin)),),
        ),
    )
    ds = load_dataset("cifar10", download=True, mirror=server.url, progress=False)
    assert ds.x_train.shape == (10, 3, 32, 32)
    assert np.array_equal(ds.y_train.numpy(), ytr)
    assert (tmp_path / "cache" / "cifar10" / "cifar-10-python.tar.gz").read_bytes() == (
        origin.read_bytes()
    )


def test_fetch_unknown_name():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'"):
        fetch("imagenet")


def test_all_sources_down_lists_each_url_and_one_hint(tmp_path, monkeypatch):
    p1, p2 = _closed_port(), _closed_port()
    files = (RemoteFile("a.gz", "0" * 32),)
    monkeypatch.setitem(
        dl.RESOURCES,
        "mnist",
        Resource("mnist", "mnist", (f"http://127.0.0.1:{p1}/", f"http://127.0.0.1:{p2}/"), files),
    )
    with pytest.raises(DownloadError) as info:
        fetch("mnist", progress=False, timeout=2)
    msg = str(info.value)
    assert msg.startswith("mnist: no source delivered a.gz:")
    assert f"http://127.0.0.1:{p1}/a.gz" in msg and f"http://127.0.0.1:{p2}/a.gz" in msg
    assert msg.count("copy it to") == 1
    assert str(tmp_path / "cache" / "mnist" / "a.gz") in msg


def test_cli_data_fetch_and_list(tmp_path, server, served_mnist, capsys):
    from bnlab.cli import main

    assert main(["data", "fetch", "mnist", "--mirror", server.url]) == 0
    assert str(tmp_path / "cache" / "mnist") in capsys.readouterr().out
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    auto = next(line for line in out.splitlines() if line.startswith("auto"))
    assert "full MNIST (cached)" in auto
    # an unreachable mirror is a clear error and exit code 2, nothing written
    dead = f"http://127.0.0.1:{_closed_port()}"
    assert main(["data", "fetch", "fashion-mnist", "--mirror", dead]) == 2
    assert "cannot download" in capsys.readouterr().err
    assert _no_temp_files(tmp_path / "cache" / "fashion-mnist")


# ------------------------------------------------------------------ deadlines, signals, leftovers
@pytest.mark.parametrize("what", ["body", "headers"])
def test_a_trickling_server_misses_the_overall_deadline(tmp_path, server, what):
    """One byte every 0.05 s never trips the per-read timeout; the deadline for the whole file
    stops it, whether the server trickles the body or already the status line and headers."""
    body = bytes(range(256)) * 8
    server.routes["/slow"] = body
    if what == "headers":
        server.trickle["/slow"] = 0.05
    else:  # fast headers, then the body byte by byte
        server.drip["/slow"] = 0.05
    with pytest.raises(DownloadError, match=r"/slow: no complete transfer within the 0.5 s "
                                            r"deadline"):
        download_file(server.url + "/slow", tmp_path / "slow", "0" * 32,
                      timeout=2.0, progress=False, deadline=0.5)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="deadline must be > 0"):
        download_file(server.url + "/slow", tmp_path / "slow", "0" * 32, deadline=0)


SIGNAL_SCRIPT = """
import sys
from bnlab.data.download import download_file
download_file(sys.argv[1], sys.argv[2], "0" * 32, timeout=5, progress=False, deadline=600)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_a_download_leaves_no_part_file(tmp_path, server, sig):
    import os
    import signal
    import subprocess
    import sys
    import time

    server.routes["/big"] = b"x" * 100_000
    server.drip["/big"] = 0.01
    folder = tmp_path / "cache"
    folder.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    # the child starts with SIGINT and SIGTERM at their defaults whatever this test process has
    # (a disposition inherited as "ignored" would make the child ignore the signal)
    def defaults() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_SCRIPT, server.url + "/big",
                             str(folder / "big.bin")], env=env, stderr=subprocess.PIPE,
                            preexec_fn=defaults)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".part") for p in folder.iterdir()):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.02)
        time.sleep(0.3)  # well inside the transfer
        proc.send_signal(getattr(signal, sig))
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert code != 0
    if sig == "SIGTERM":
        assert code == -signal.SIGTERM  # passed on: the process ends as SIGTERM would end it
    assert list(folder.iterdir()) == []


def test_abandoned_part_files_are_removed_at_the_next_download(tmp_path, server):
    """A .part nobody holds and untouched for a while was left by a killed download: the next
    download into the folder removes it; a locked one (a download in progress) stays."""
    import fcntl
    import os
    import time

    from bnlab._fileutil import STALE_AFTER

    payload = b"hello"
    server.routes["/f"] = payload
    abandoned = tmp_path / ".other.gz.k3j2.part"
    held = tmp_path / ".f.abcd.part"
    for p in (abandoned, held):
        p.write_bytes(b"half")
        old = time.time() - STALE_AFTER - 60
        os.utime(p, (old, old))
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        import hashlib

        md5 = hashlib.md5(payload).hexdigest()
        download_file(server.url + "/f", tmp_path / "f", md5, progress=False)
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["f", held.name])
