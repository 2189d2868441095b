"""Training on several processes of one machine with ``torch.distributed`` (gloo on CPUs).

* :func:`world` / :func:`is_distributed`: this process's rank and the number of processes
  (``(0, 1)`` without an initialized process group).
* :func:`shard`: the contiguous part of a global mini-batch that a rank takes.
* :func:`launch`: run a function on ``nproc`` new processes forming a gloo process group on
  this machine (loopback only: the rendezvous is a file, the gloo connections use the loopback
  interface), and collect what each returns. Used by ``bnlab run ... --nproc N`` and the tests.

:func:`bnlab.train.fit` trains data-parallel by itself when a process group is initialized,
whether by :func:`launch` or by ``torchrun`` (``torchrun --nproc-per-node 2 script.py`` with
``torch.distributed.init_process_group("gloo")`` in the script); see docs/small-batches.md.
Only ``torch.distributed`` collectives are used.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["world", "is_distributed", "shard", "launch", "loopback_interface", "warm_kernels"]


def world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (default: the world); ``(0, 1)`` when
    torch.distributed is not initialized."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_distributed() -> bool:
    """True in an initialized process group of more than one process."""
    return world()[1] > 1


def shard(n: int, rank: int, size: int) -> slice:
    """The part of a global batch of ``n`` examples rank ``rank`` of ``size`` takes: contiguous,
    sizes differing by at most one, the larger parts first (as ``torch.tensor_split``)."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"shard: need 0 <= rank < size, got rank {rank} of {size}")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def loopback_interface() -> str | None:
    """The name of the loopback network interface (``lo`` on Linux), or None."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    for name in names:
        if name == "lo" or name.startswith("lo"):
            return name
    return None


def warm_kernels() -> None:
    """Compile bnlab's Numba kernels in this process (or load them from Numba's on-disk cache)
    before starting processes that use them. Processes compiling the same kernels at the same
    time write the cache concurrently; that has left index entries pointing at another
    signature's machine code, and a later process crashed (SIGSEGV) loading them. Nothing to do
    when the kernels are off (backend "reference" or no Numba)."""
    from . import backend

    if backend.kernels_enabled():
        from .kernels import warm_up

        warm_up()


def _rank_main(rank: int, nproc: int, store: str, fn: Callable[..., Any], args: Sequence[Any],
               results: Any, threads: int, timeout: float) -> None:  # fmt: skip
    """Entry point of one launched process: join the group, run ``fn(*args)``, report."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group(
            "gloo", init_method="file://" + store, rank=rank, world_size=nproc,
            timeout=datetime.timedelta(seconds=timeout),
        )  # fmt: skip
        try:
            out = fn(*args)
        finally:
            dist.destroy_process_group()
        # plain pickle bytes: torch's queue reductions would share tensors through file
        # descriptors that die with this process
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # report, never leave the parent waiting
        results.put((rank, "error", traceback.format_exc()))


def launch(
    fn: Callable[..., Any],
    nproc: int,
    args: Sequence[Any] = (),
    *,
    threads: int = 1,
    timeout: float = 600.0,
) -> list[Any]:
    """Run ``fn(*args)`` on ``nproc`` new processes that form a gloo process group (ranks
    0..nproc-1, on this machine only) and return their results in rank order.

    ``fn`` and ``args`` must be picklable (a module-level function). Each process uses
    ``threads`` torch threads (Numba's pool is sized the same) and ignores Ctrl-C; the parent
    stops them when it is interrupted. The kernels are compiled here first
    (:func:`warm_kernels`). A process that raises makes :func:`launch` raise
    ``RuntimeError`` with its traceback (the others are stopped); collectives time out after
    ``timeout`` seconds.
    """
    import multiprocessing as mp
    import queue as queue_mod

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"launch: nproc must be a positive int, got {nproc!r}")
    warm_kernels()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    env = {"NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}  # fmt: skip
    lo = loopback_interface()
    if lo and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = lo
    with tempfile.TemporaryDirectory(prefix="bnlab-dist-") as tmp:
        store = os.path.join(tmp, "store")
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the children start with these (thread pools are sized at start)
        try:
            procs = [
                ctx.Process(target=_rank_main, daemon=True,
                            args=(r, nproc, store, fn, args, results, threads, timeout))
                for r in range(nproc)
            ]  # fmt: skip
            for p in procs:
                p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        out: dict[int, Any] = {}
        try:
            while len(out) < nproc:
                try:
                    rank, status, payload = results.get(timeout=1.0)
                except queue_mod.Empty:
                    dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in out]
                    if dead:
                        raise RuntimeError(
                            f"launch: process of rank {dead[0]} exited without a result "
                            f"(exit code {procs[dead[0]].exitcode})"
                        ) from None
                    continue
                if status == "error":
                    raise RuntimeError(f"launch: rank {rank} of {nproc} failed:\n{payload}")
                out[rank] = pickle.loads(payload)
        finally:
            for p in procs:
                p.join(timeout=5 if len(out) == nproc else 0.1)
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
    return [out[r] for r in range(nproc)]
