"""Numba's on-disk cache, safe for processes that compile the same functions at the same time.

Numba keeps one index file per function (signature -> data file) beside numbered data files,
and a save reads the index, picks a data file, writes the index and then the data. Two
processes saving different signatures of one function at once can both pick the same data
file: the index then names one signature and the data file holds the other's machine code,
which a later process loads for the wrong signature. :func:`install` makes every save and
load of the cache hold a lock on the cache's directory (``flock``: exclusive for a save,
shared for a load), so each save is whole before another process reads or writes that
directory's cache. This is what lets :func:`bnlab.kernels.warm_up` compile in several
processes, and lets processes started side by side on a fresh install (a distributed job's
ranks, an experiment's workers) compile the kernels at the same time.
"""

from __future__ import annotations

import contextlib
import os

try:
    import fcntl
except ImportError:  # pragma: no cover (not POSIX: no lock, and warm-up stays in one process)
    fcntl = None

_installed = False


def install() -> bool:
    """Wrap the saves and loads of Numba's cache files in the directory lock (once per
    process). Returns whether the lock is in place: False where there is no ``flock`` or this
    Numba keeps its cache otherwise."""
    global _installed
    if _installed:
        return True
    if fcntl is None:
        return False
    try:
        from numba.core.caching import IndexDataCacheFile as cache_file
    except ImportError:  # pragma: no cover (another Numba layout)
        return False
    save, load = getattr(cache_file, "save", None), getattr(cache_file, "load", None)
    if save is None or load is None:  # pragma: no cover
        return False

    def locked_save(self, key, data):
        with _locked(self, fcntl.LOCK_EX):
            return save(self, key, data)

    def locked_load(self, key):
        with _locked(self, fcntl.LOCK_SH):
            return load(self, key)

    cache_file.save, cache_file.load = locked_save, locked_load
    _installed = True
    return True


@contextlib.contextmanager
def _locked(cache_file, how: int):
    """Hold ``flock(how)`` on the directory of ``cache_file`` (released when its descriptor
    closes). A directory that cannot be opened is not locked: the save or load that follows
    meets the same error Numba reports without the lock."""
    try:
        fd = os.open(cache_file._cache_path, os.O_RDONLY)
    except (OSError, AttributeError, TypeError):
        yield
        return
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)
