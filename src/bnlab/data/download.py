"""The data cache and downloads: where files live, where they come from, how they are checked.

Cache: ``$BNLAB_DATA`` if set, else ``~/.cache/bnlab``; one folder per data set, named like the
data set (``mnist/``, ``fashion-mnist/``, ``cifar10/``), holding the files under their official
names. Files placed there by hand are used as they are.

Downloads happen only on request (``bnlab data fetch NAME``, or ``download=True``). Each file is
streamed into a temporary file in the destination folder while its MD5 is computed, compared with
the checksum the data set's authors publish, flushed with ``fsync`` and moved into place with
``os.replace``; so a cut connection, a truncated or corrupted transfer never replaces a good file
and leaves no temporary file behind, nor does Ctrl-C or SIGTERM. Sockets time out after
:data:`TIMEOUT` seconds without data, and each file has an overall deadline (:data:`DEADLINE`),
so a server that trickles bytes cannot hold a download forever; an unreachable host gives a
``DownloadError`` naming the URL and saying how to place the file by hand. The temporary
``.<name>.*.part`` file is locked by its writer; one a killed process left behind (SIGKILL) is
removed by the next download into the same folder.

Mirror: ``mirror=`` or ``$BNLAB_DATA_MIRROR`` is a base URL laid out like the cache
(``MIRROR/mnist/train-images-idx3-ubyte.gz``, ...); it replaces the official URLs. Tests use it to
point at a server on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .._fileutil import fsync_dir, locked_temp, remove_stale

__all__ = [
    "RESOURCES",
    "SYSTEM_DIRS",
    "ChecksumError",
    "DownloadError",
    "RemoteFile",
    "Resource",
    "cache_dir",
    "dataset_dir",
    "download_file",
    "fetch",
    "find_file",
    "locate",
    "md5sum",
    "missing_files",
]

ENV_DATA = "BNLAB_DATA"
ENV_MIRROR = "BNLAB_DATA_MIRROR"
TIMEOUT = 10.0  # seconds: for the connection, and for each read on the socket
DEADLINE = 1800.0  # seconds: for a whole file (CIFAR-10's 170 MB at 100 kB/s takes 28 minutes)
_CHUNK = 1 << 16
_USER_AGENT = "bnlab-data/0.1 (python urllib)"


@dataclass(frozen=True)
class RemoteFile:
    """One published file: its official name and the MD5 its authors publish."""

    name: str
    md5: str


@dataclass(frozen=True)
class Resource:
    """A downloadable data set: cache folder, base URLs tried in order, files."""

    name: str
    subdir: str
    base_urls: tuple[str, ...]
    files: tuple[RemoteFile, ...]

    def file(self, name: str) -> RemoteFile:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(f"{self.name}: no file named {name!r}")


# The MD5 checksums are the ones published with each data set (MNIST and Fashion-MNIST: of the
# .gz files; CIFAR-10: of the python tarball).
RESOURCES: dict[str, Resource] = {
    "mnist": Resource(
        name="mnist",
        subdir="mnist",
        base_urls=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",  # copy of the official files
            "http://yann.lecun.com/exdb/mnist/",  # the original site (often refuses scripts)
        ),
        files=(
            RemoteFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            RemoteFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
    ),
    "fashion-mnist": Resource(
        name="fashion-mnist",
        subdir="fashion-mnist",
        base_urls=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        files=(
            RemoteFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            RemoteFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ),
    ),
    "cifar10": Resource(
        name="cifar10",
        subdir="cifar10",
        base_urls=("https://www.cs.toronto.edu/~kriz/",),
        files=(RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
    ),
}

# Folders outside the cache searched (after it) for a data set's files. Debian's
# ``dataset-fashion-mnist`` package installs the four Fashion-MNIST .gz files here, re-compressed:
# their contents are the official ones but the .gz bytes (and so their MD5s) differ, which is why
# loading validates the IDX headers rather than the published checksums.
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}


class DownloadError(OSError):
    """A file could not be fetched (no network, host unreachable, HTTP error, cut connection)."""


class ChecksumError(ValueError):
    """A downloaded file's MD5 differs from the published one; the file was not kept."""


def cache_dir(root: str | Path | None = None) -> Path:
    """The cache root: ``root`` if given, else ``$BNLAB_DATA``, else ``~/.cache/bnlab``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_DATA)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "bnlab"


def _resource(name: str) -> Resource:
    if name not in RESOURCES:
        raise ValueError(f"unknown data set {name!r}: downloadable ones are {sorted(RESOURCES)}")
    return RESOURCES[name]


def dataset_dir(name: str, root: str | Path | None = None) -> Path:
    """The cache folder of data set ``name`` (it need not exist)."""
    return cache_dir(root) / _resource(name).subdir


def find_file(directory: Path, filename: str) -> Path | None:
    """``directory/filename`` if it is a file, else its uncompressed twin (``.gz`` dropped)."""
    for candidate in (filename, filename.removesuffix(".gz")):
        path = directory / candidate
        if path.is_file():
            return path
    return None


def missing_files(name: str, directory: Path) -> list[str]:
    """Official names of the files of ``name`` found in ``directory`` neither gzipped nor raw."""
    return [f.name for f in _resource(name).files if find_file(directory, f.name) is None]


def locate(name: str, root: str | Path | None = None, system: bool = True) -> Path | None:
    """The first folder holding every file of data set ``name``: the cache folder, then (when
    ``system``) the folders of :data:`SYSTEM_DIRS`. ``None`` when none does."""
    dirs = [dataset_dir(name, root)]
    if system:
        dirs += list(SYSTEM_DIRS.get(name, ()))
    for d in dirs:
        if d.is_dir() and not missing_files(name, d):
            return d
    return None


def md5sum(path: str | Path) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _by_hand(dest: Path, md5: str) -> str:
    return (
        f"If this machine is offline, download the file elsewhere and copy it to {dest} "
        f"(MD5 {md5}), or set {ENV_MIRROR} to a server laid out like the cache "
        f"(see docs/data.md)"
    )


def _offline(reason: str, dest: Path, md5: str) -> DownloadError:
    """A DownloadError saying what failed and how to place the file by hand; ``.reason`` keeps
    the first part alone, so ``fetch`` can list several failed sources with one hint."""
    err = DownloadError(f"{reason}. {_by_hand(dest, md5)}")
    err.reason = reason
    err.hint = _by_hand(dest, md5)
    return err


def _is_part_name(name: str) -> bool:
    """A temporary file of :func:`download_file` (``.<name>.XXXX.part``)."""
    return name.startswith(".") and name.endswith(".part")


class _Watchdog:
    """The overall deadline of one download: every socket the request opens is recorded, and
    when the deadline passes they are shut down, so a blocked read (of the headers or the body)
    returns at once however slowly the server sends."""

    def __init__(self, deadline: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(deadline, self._expire)
        self._timer.daemon = True

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)

    def connection_class(self, base: type) -> type:
        watchdog = self

        class Connection(base):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                super().connect()
                watchdog.add(self.sock)

        return Connection

    def opener(self) -> urllib.request.OpenerDirector:
        watchdog = self

        class HTTP(urllib.request.HTTPHandler):
            def do_open(self, http_class, req, **kwargs):  # type: ignore[no-untyped-def]
                return super().do_open(watchdog.connection_class(http_class), req, **kwargs)

        class HTTPS(urllib.request.HTTPSHandler):
            def do_open(self, http_class, req, **kwargs):  # type: ignore[no-untyped-def]
                return super().do_open(watchdog.connection_class(http_class), req, **kwargs)

        return urllib.request.build_opener(HTTP(), HTTPS())

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


class _Terminated(BaseException):
    """Raised by the SIGTERM handler of :func:`_sigterm_cleans_up` (a BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def _sigterm_cleans_up() -> Iterator[None]:
    """During the block, SIGTERM raises :class:`_Terminated` (so ``finally`` and ``except
    BaseException`` clean-up runs); afterwards the signal is delivered again to the handler that
    was in place (by default: the process ends, killed by SIGTERM, as it would have). Only in the
    main thread; elsewhere, and when SIGTERM is ignored, the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN or previous is None:
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise _Terminated

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(signal.SIGTERM)  # the previous handler decides (default: exit)
        raise DownloadError("the download was stopped by SIGTERM") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def download_file(
    url: str,
    dest: str | Path,
    md5: str,
    timeout: float = TIMEOUT,
    progress: bool = True,
    deadline: float = DEADLINE,
) -> Path:
    """Stream ``url`` into ``dest`` atomically, checking its MD5 against ``md5``.

    The bytes go to a temporary file beside ``dest`` (same folder, so the final rename is atomic),
    are hashed on the way, flushed and ``fsync``-ed, and moved over ``dest`` with ``os.replace``
    only when the checksum matches. On any failure (including Ctrl-C and SIGTERM, which is then
    passed on to the handler that was in place) the temporary file is removed and ``dest``, if it
    existed, is left untouched. Abandoned temporary files of killed downloads in the folder are
    removed first.

    ``timeout`` bounds the connection and each read; ``deadline`` the whole transfer, headers
    included, however slowly the server sends (seconds).

    Raises ``DownloadError`` (an ``OSError``) when the host cannot be reached, answers with an
    HTTP error, the transfer stops short of its announced length (truncated) or misses the
    deadline; ``ChecksumError`` (a ``ValueError``) when the bytes arrive but their MD5 is not
    ``md5``.
    """
    dest = Path(dest)
    if not deadline > 0:
        raise ValueError(f"download_file: deadline must be > 0 seconds, got {deadline!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest.parent, _is_part_name)
    with _sigterm_cleans_up(), _Watchdog(deadline) as watchdog:
        fd, tmp = locked_temp(dest.parent, f".{dest.name}.", ".part")
        try:
            with os.fdopen(fd, "wb") as out:
                _transfer(url, dest, md5, timeout, progress, deadline, watchdog, out)
                tmp.chmod(0o644)  # mkstemp makes it private; a cached file is readable by all
                os.replace(tmp, dest)  # while the lock is held: an unlocked .part is abandoned
            fsync_dir(dest.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return dest


def _transfer(url, dest: Path, md5: str, timeout: float, progress: bool, deadline: float,
              watchdog: _Watchdog, out) -> None:  # type: ignore[no-untyped-def]
    """The request, the streamed body (hashed on the way) and its checks, into ``out``."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    received = 0

    def late() -> DownloadError:
        return DownloadError(
            f"cannot download {url}: no complete transfer within the {deadline:g} s deadline "
            f"({received} bytes received; the server is too slow); {dest} was not changed"
        )

    try:
        response = watchdog.opener().open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise _offline(f"cannot download {url}: HTTP {exc.code} {exc.reason}", dest, md5) from exc
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as exc:
        if watchdog.expired:
            raise late() from exc
        reason = getattr(exc, "reason", exc)
        raise _offline(
            f"cannot download {url}: {reason} (offline, or host unreachable)", dest, md5
        ) from exc
    with response:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        digest = hashlib.md5(usedforsecurity=False)
        bar = _progress_bar(dest.name, total, progress)
        try:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except http.client.IncompleteRead as exc:
                    received += len(exc.partial)
                    if watchdog.expired:
                        raise late() from exc
                    raise DownloadError(
                        f"cannot download {url}: truncated, the connection closed after "
                        f"{received} of {total} bytes; {dest} was not changed"
                    ) from exc
                except OSError as exc:  # includes timeouts
                    if watchdog.expired:
                        raise late() from exc
                    raise DownloadError(
                        f"cannot download {url}: the transfer stopped after {received} "
                        f"bytes ({exc}); {dest} was not changed"
                    ) from exc
                if watchdog.expired:
                    raise late()
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
    if total is not None and received != total:
        raise DownloadError(
            f"cannot download {url}: truncated, received {received} of {total} bytes; "
            f"{dest} was not changed"
        )
    got = digest.hexdigest()
    if got != md5.lower():
        raise ChecksumError(
            f"{dest.name} from {url}: checksum mismatch, MD5 {got} but the published "
            f"one is {md5} (corrupted or incomplete transfer); {dest} was not changed"
        )
    out.flush()
    os.fsync(out.fileno())


def _progress_bar(desc: str, total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        leave=True,
    )


def _base_urls(resource: Resource, mirror: str | None) -> list[str]:
    mirror = mirror or os.environ.get(ENV_MIRROR) or None
    if mirror:
        return [mirror.rstrip("/") + "/" + resource.subdir + "/"]
    return list(resource.base_urls)


def fetch(
    name: str,
    root: str | Path | None = None,
    mirror: str | None = None,
    progress: bool = True,
    timeout: float = TIMEOUT,
    deadline: float = DEADLINE,
) -> Path:
    """Download data set ``name`` (``mnist``, ``fashion-mnist``, ``cifar10``) into the cache.

    Files already present with the published MD5 are kept as they are; a missing or different
    file is downloaded (from ``mirror``/``$BNLAB_DATA_MIRROR`` if set, else from each official
    URL in turn) and replaces the old one only once its checksum matches; ``timeout`` and
    ``deadline`` are those of :func:`download_file`. Returns the data set's cache folder.
    Raises ``DownloadError`` or ``ChecksumError`` naming the URL and the problem when no source
    delivers a good copy.
    """
    resource = _resource(name)
    directory = dataset_dir(name, root)
    directory.mkdir(parents=True, exist_ok=True)
    bases = _base_urls(resource, mirror)
    for remote in resource.files:
        dest = directory / remote.name
        if dest.is_file() and md5sum(dest) == remote.md5:
            continue
        errors: list[Exception] = []
        for base in bases:
            try:
                download_file(base + remote.name, dest, remote.md5, timeout, progress, deadline)
                break
            except (DownloadError, ChecksumError) as exc:
                errors.append(exc)
        else:
            if len(errors) == 1:
                raise errors[0]
            detail = "\n  ".join(getattr(e, "reason", str(e)) for e in errors)
            hints = [h for e in errors if (h := getattr(e, "hint", None))]
            message = f"{name}: no source delivered {remote.name}:\n  {detail}"
            if hints:
                message += "\n" + hints[0]
            kind = (
                ChecksumError
                if all(isinstance(e, ChecksumError) for e in errors)
                else (DownloadError)
            )
            raise kind(message) from errors[-1]
    return directory
