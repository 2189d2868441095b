"""Small file-system helpers shared by downloads, checkpoints and run directories (atomic,
durable writes, and the clean-up of temporary files that killed writers leave behind).

Every temporary file bnlab writes beside a target (``.<name>.tmp-XXXX`` for checkpoints and
text files, ``.<name>.XXXX.part`` for downloads) is held with an exclusive ``flock`` by its writer
from creation until it has been renamed over the target. A process that dies (SIGKILL, power
loss) releases the lock, so a temporary file that nobody holds is known to be abandoned:
:func:`remove_stale` deletes such files at the next write into the same folder. Files modified
in the last :data:`STALE_AFTER` seconds are left alone, which covers the instant between a
file's creation and its lock, and writers that take no lock.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "STALE_AFTER",
    "atomic_write",
    "atomic_write_text",
    "fsync_dir",
    "is_temp_name",
    "locked_temp",
    "remove_stale",
]

#: seconds a temporary file must have gone unmodified (and unlocked) to count as abandoned
STALE_AFTER = 600.0


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_temp_name(name: str) -> bool:
    """A temporary file of :func:`atomic_write_text` or ``save_checkpoint``
    (``.<name>.tmp-XXXX``)."""
    return name.startswith(".") and ".tmp-" in name


def locked_temp(directory: Path, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """A new temporary file in ``directory`` (``mkstemp``), opened for writing and held with an
    exclusive ``flock`` until its descriptor is closed. Returns ``(fd, path)``."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without flock: the age rule of remove_stale still applies
        pass
    return fd, Path(name)


def remove_stale(
    directory: Path, match: Callable[[str], bool], older_than: float = STALE_AFTER
) -> list[Path]:
    """Delete the temporary files in ``directory`` whose name satisfies ``match``, that no
    process holds locked and that have not been modified for ``older_than`` seconds: those left
    by writers that were killed. Returns the paths removed; never raises for a file it cannot
    inspect (it is left alone)."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not match(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: its writer is alive
            # the name still refers to the file we locked (not renamed over a target meanwhile)
            if os.stat(entry.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # (elsewhere: read by setting it, and set it back at once)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """Permission bits for a file about to replace ``path``: those of the file there, or what
    ``open(path, "w")`` would give a new one (0o666 less the umask); ``mkstemp`` alone would
    leave every atomically written file private to its owner."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Replace ``path`` with what ``write(fh)`` writes into a binary file handle, so that a
    reader (or a crash at any moment) sees either the old file or the new one, never a part:
    temp file in the same folder (locked until renamed), fsync, ``os.replace``, fsync of the
    folder. The new file keeps the old one's permission bits (a new file gets those of
    ``open``). Abandoned temp files of earlier writes in the folder are removed first
    (:func:`remove_stale`). Returns ``path``."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    remove_stale(directory, is_temp_name)
    fd, tmp = locked_temp(directory, f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _mode_for(path))
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
            os.replace(tmp, path)  # while the lock is held: an unlocked temp file is abandoned
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
