"""The compiled loops of two copies of ``bnlab/kernels/_numba.py`` side by side, on preallocated
arrays (no allocation, no Python wrapper): what a change to the loops themselves bought.

    PYTHONPATH=src python benchmarks/bench_loops.py --old OLD/_numba.py [--threads 1] [--calls 60]

``--old`` is a copy of the module from another commit (e.g. ``git show REV:src/bnlab/kernels/
_numba.py > /tmp/old_numba.py``); ``--new`` defaults to this checkout's. For each shape, contiguous
(``ncs``) and channels_last (``mc``): training forward with the ReLU fused, backward, eval
forward; the minimum over ``--calls`` calls, microseconds, old and new interleaved. Both copies
compile into a private Numba cache directory (a module loaded from a path must not share the
package's on-disk cache).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

SHAPES = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8), (64, 64, 32, 32), (32, 8, 8, 8),
          (60, 100, 1, 1)]  # fmt: skip


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _min_us(fn, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def _loops(k, ncs: bool, size: int):
    """(train forward, backward, eval forward) of module ``k`` for a layout."""
    if ncs:
        return k.train_fwd_ncs, k.backward_ncs, k.eval_fwd_ncs
    if hasattr(k, "train_fwd_serial") and size <= k.SERIAL_MAX:  # older module: own serial pair
        return k.train_fwd_serial, k.backward_serial, k.eval_fwd_mc
    return k.train_fwd_mc, k.backward_mc, k.eval_fwd_mc


def _arrays(np, rng, shape, c):
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    return dict(x=x, dy=dy, y=np.empty_like(x), dx=np.empty_like(x),
                st=np.empty((6, c), np.float32), gr=np.empty((2, c), np.float32),
                w=np.ones(c, np.float32))  # fmt: skip


def _time(k, ncs: bool, a: dict, calls: int) -> tuple[float, float, float]:
    """(forward with ReLU, backward, eval) minimum microseconds of module ``k``'s loops."""
    fwd, bwd, ev = _loops(k, ncs, a["x"].size)
    x, y, dy, dx, st, gr, w = (a[n] for n in ("x", "y", "dy", "dx", "st", "gr", "w"))
    on = True
    return (
        _min_us(lambda: fwd(x, w, w, True, True, 1e-5, True, y, st), calls),
        _min_us(lambda: bwd(dy, x, y, on, st[0], st[2], w, on, on, on, on, dx, gr), calls),
        _min_us(lambda: ev(x, st[0], st[1], w, w, True, True, 1e-5, False, y, st[:4]), calls),
    )


def main(argv=None) -> None:
    here = Path(__file__).resolve().parents[1] / "src" / "bnlab" / "kernels" / "_numba.py"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="path of the older _numba.py")
    p.add_argument("--new", default=str(here), help="path of the newer _numba.py")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=60)
    args = p.parse_args(argv)
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="bnlab-loops-")
    import numba
    import numpy as np

    old, new = _load(args.old, "bnlab_loops_old"), _load(args.new, "bnlab_loops_new")
    numba.set_num_threads(args.threads)
    print(f"threads {numba.get_num_threads()}, minimum of {args.calls} calls, microseconds")
    rng = np.random.default_rng(0)
    for n, c, h, w in SHAPES:
        s = h * w
        for ncs in (True, False):
            if ncs and s == 1:
                continue
            shape = (n, c, s) if ncs else (n * s, c)
            a = _arrays(np, rng, shape, c)
            res = {name: _time(k, ncs, a, args.calls) for name, k in (("old", old), ("new", new))}
            o, nw = res["old"], res["new"]
            print(f"{(n, c, h, w)} {'ncs' if ncs else 'mc '} fwd old {o[0]:.0f} new {nw[0]:.0f} | "
                  f"bwd old {o[1]:.0f} new {nw[1]:.0f} | eval old {o[2]:.0f} new {nw[2]:.0f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
