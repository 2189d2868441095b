"""Thread settings for experiments that train in worker processes side by side."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_POOL_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_threads(threads: int) -> None:
    """Threads for torch and for the Numba kernels' pool alike, so processes side by side do not
    oversubscribe the cores."""
    torch.set_num_threads(threads)
    import numba

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


@contextlib.contextmanager
def thread_env(threads: int) -> Iterator[None]:
    """Thread pools of the processes started inside: at most ``threads`` each, from the start.

    ``torch.set_num_threads`` / ``numba.set_num_threads`` in a worker are not enough: Numba's
    OpenMP pool is created with ``NUMBA_NUM_THREADS`` threads (default: every core), and its idle
    threads spin on the other workers' cores. The variables size the pools when they start.
    """
    saved = {key: os.environ.get(key) for key in _POOL_VARIABLES}
    os.environ.update(dict.fromkeys(_POOL_VARIABLES, str(threads)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
