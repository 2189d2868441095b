"""Small generated data files for the data-layer tests: IDX sets laid out like MNIST, CIFAR-10
tarballs, and a local HTTP server on 127.0.0.1 that can also misbehave (truncate, stall)."""

from __future__ import annotations

import contextlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

from bnlab.data.idx import write_idx

IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def make_idx_set(
    directory: Path, n_train: int = 12, n_test: int = 5, seed: int = 0, compress: bool = True
) -> dict[str, np.ndarray]:
    """Write an MNIST-like set of four IDX files (random 28x28 uint8 images, labels 0-9) into
    ``directory`` under the official names (``.gz`` dropped when ``compress`` is false)."""
    rng = np.random.default_rng(seed)
    arrays = {
        IDX_NAMES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_NAMES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        IDX_NAMES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_NAMES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        target = directory / (name if compress else name.removesuffix(".gz"))
        write_idx(target, arr, compress=compress)
    return arrays


CIFAR_LABEL_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _py2_str(b: bytes) -> bytes:
    """Pickle opcodes for a Python 2 ``str`` (SHORT_BINSTRING or BINSTRING)."""
    if len(b) < 256:
        return b"U" + bytes([len(b)]) + b
    return b"T" + struct.pack("<i", len(b)) + b


def _py2_int(n: int) -> bytes:
    return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)


def py2_cifar_batch(data: np.ndarray, labels) -> bytes:
    """A CIFAR batch pickled the way the official archive's were: protocol 2 from Python 2, byte
    strings as ``str`` opcodes, the array built by ``numpy.core.multiarray._reconstruct`` with a
    ``(1, shape, dtype, False, raw_bytes)`` state. Written opcode by opcode, since Python 3 cannot
    produce Python 2 strings."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + _py2_int(0)
        + b"\x85"
        + _py2_str(b"b")
        + b"\x87R"  # _reconstruct(ndarray, (0,), 'b')
    )
    shape = b"(" + b"".join(_py2_int(n) for n in data.shape) + b"t"
    dtype = (
        b"cnumpy\ndtype\n"
        + _py2_str(b"u1")
        + _py2_int(0)
        + _py2_int(1)
        + b"\x87R"
        + b"("
        + _py2_int(3)
        + _py2_str(b"|")
        + b"NNN"
        + _py2_int(-1)
        + _py2_int(-1)
        + _py2_int(0)
        + b"tb"  # dtype('u1').__setstate__((3, '|', None, None, None, -1, -1, 0))
    )
    array += b"(" + _py2_int(1) + shape + dtype + b"\x89" + _py2_str(data.tobytes()) + b"tb"
    labels_ops = b"](" + b"".join(_py2_int(int(v)) for v in labels) + b"e"
    return (
        b"\x80\x02}("
        + _py2_str(b"batch_label")
        + _py2_str(b"generated batch")
        + _py2_str(b"data")
        + array
        + _py2_str(b"labels")
        + labels_ops
        + b"u."
    )


def cifar_batch_bytes(
    data: np.ndarray, labels, protocol: int | str = 4, bytes_keys: bool = False, **extra
) -> bytes:
    """A pickled CIFAR-style batch dict {'data': (N, 3072) uint8, 'labels': list, ...};
    ``protocol="py2"`` writes it like the official files (see :func:`py2_cifar_batch`)."""
    if protocol == "py2":
        return py2_cifar_batch(data, labels)
    batch = {"batch_label": "generated", "data": data, "labels": list(labels), **extra}
    if bytes_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    return pickle.dumps(batch, protocol=protocol)


def make_cifar_tarball(
    path: Path,
    n_per_batch: int = 3,
    seed: int = 0,
    protocol: int | str = 4,
    bytes_keys: bool = False,
    members: dict[str, bytes] | None = None,
    folder: Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write a tar.gz laid out like ``cifar-10-python.tar.gz`` (five train batches, a test batch,
    batches.meta) with random data; ``members`` replaces or adds members by name. When ``folder``
    is given the same members are also written there as an extracted ``cifar-10-batches-py``.
    Returns (x_train, y_train, x_test, y_test) as the raw uint8 rows and int labels."""
    rng = np.random.default_rng(seed)
    content: dict[str, bytes] = {}
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n_per_batch)
        xs.append(x)
        ys.append(y)
        content[f"data_batch_{i}"] = cifar_batch_bytes(x, y.tolist(), protocol, bytes_keys)
    xte = rng.integers(0, 256, (n_per_batch + 1, 3072), dtype=np.uint8)
    yte = rng.integers(0, 10, n_per_batch + 1)
    content["test_batch"] = cifar_batch_bytes(xte, yte.tolist(), protocol, bytes_keys)
    meta = {"label_names": CIFAR_LABEL_NAMES, "num_cases_per_batch": n_per_batch}
    if bytes_keys:
        meta = {k.encode(): v for k, v in meta.items()}
    content["batches.meta"] = pickle.dumps(meta, protocol=2 if protocol == "py2" else protocol)
    content.update(members or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in content.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, blob in content.items():
            (folder / name).write_bytes(blob)
    return np.concatenate(xs), np.concatenate(ys), xte, yte


class LocalServer:
    """An HTTP server on 127.0.0.1 (ephemeral port, daemon thread) serving ``routes``:
    path -> bytes. ``truncate[path] = k`` announces the full length but sends only k bytes and
    closes; ``stall[path] = seconds`` waits before answering; ``trickle[path] = seconds`` sends
    the whole answer, status line and headers included, one byte per that many seconds;
    ``drip[path] = seconds`` sends the headers at once and then the body in the same way.
    ``hits`` counts GETs per path."""

    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}
        self.truncate: dict[str, int] = {}
        self.stall: dict[str, float] = {}
        self.trickle: dict[str, float] = {}
        self.drip: dict[str, float] = {}
        self.hits: dict[str, int] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                if self.path in outer.stall:
                    time.sleep(outer.stall[self.path])
                body = outer.routes.get(self.path)
                if body is not None and self.path in outer.trickle:
                    raw = (
                        f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    with contextlib.suppress(OSError):  # the client may give up: that is the test
                        for i in range(len(raw)):
                            self.wfile.write(raw[i : i + 1])
                            self.wfile.flush()
                            time.sleep(outer.trickle[self.path])
                    self.close_connection = True
                    return
                if body is None:
                    self.send_error(404, "not here")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                k = outer.truncate.get(self.path)
                with contextlib.suppress(OSError):
                    if self.path in outer.drip:
                        for i in range(len(body)):
                            self.wfile.write(body[i : i + 1])
                            self.wfile.flush()
                            time.sleep(outer.drip[self.path])
                        return
                    self.wfile.write(body if k is None else body[:k])
                    self.wfile.flush()
                if k is not None:
                    self.close_connection = True

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
