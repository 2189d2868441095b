"""The compiled loops of two copies of ``bnlab/kernels/_numba.py`` side by side, on preallocated
arrays (no allocation, no Python wrapper): what a change to the loops themselves bought.

    PYTHONPATH=src python benchmarks/bench_loops.py --old OLD/_numba.py [--threads 1] [--calls 60]

``--old`` is a copy of the module from another commit (e.g. ``git show REV:src/bnlab/kernels/
_numba.py > /tmp/old_numba.py``); ``--new`` defaults to this checkout's. For each shape, contiguous
(``ncs``) and channels_last (``mc``): training forward with the ReLU fused, backward, eval
forward; the median over ``--calls`` rounds, microseconds, old and new interleaved in a shuffled
order within each round, and old / new. Both copies
compile into a private Numba cache directory (a module loaded from a path must not share the
package's on-disk cache).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from pathlib import Path

SHAPES = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8), (64, 64, 32, 32), (32, 8, 8, 8),
          (128, 256, 14, 14), (32, 2048, 7, 7), (4096, 1024, 1, 1), (60, 100, 1, 1)]  # fmt: skip


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


def _backward_args(bwd, a: dict) -> tuple:
    """The backward's arguments by its parameters' names, so that copies of the module from
    before a change of its signature run too: the mask read from x (``m``, coefficients ``k``,
    ``floor``) or from y; the parameter gradients as one (2, C) array (``grads``) or two rows."""
    st, gr, floor = a["st"], a["gr"], a["x"].dtype.type(0)  # (the floor in x's dtype)
    values = dict(dy=a["dy"], x=a["x"], m=a["x"], y=a["y"], relu=True, k=st[3:5], floor=floor,
                  mean=st[0], invstd=st[2], w=a["w"], has_w=True, train=True, need_sums=True,
                  need_dx=True, dx=a["dx"], grads=gr, dgamma=gr[0], dbeta=gr[1])  # fmt: skip
    code = bwd.py_func.__code__
    return tuple(values[n] for n in code.co_varnames[: code.co_argcount] if n in values)


def _calls(k, ncs: bool, a: dict) -> dict:
    """{"fwd": forward with ReLU, "bwd": backward, "eval": eval forward} of module ``k``'s loops
    on the arrays ``a``, as zero-argument callables."""
    fwd, bwd, ev = _loops(k, ncs, a["x"].size)
    x, y, st, w = (a[n] for n in ("x", "y", "st", "w"))
    b_args = _backward_args(bwd, a)
    return {
        "fwd": lambda: fwd(x, w, w, True, True, 1e-5, True, y, st),
        "bwd": lambda: bwd(*b_args),
        "eval": lambda: ev(x, st[0], st[1], w, w, True, True, 1e-5, False, y, st[:4]),
    }


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

    from bnlab.bench import _interleaved  # (median seconds, shuffled rounds)

    old, new = _load(args.old, "bnlab_loops_old"), _load(args.new, "bnlab_loops_new")
    numba.set_num_threads(args.threads)
    print(f"threads {numba.get_num_threads()}, median of {args.calls} interleaved rounds, "
          "microseconds")  # fmt: skip
    rng = np.random.default_rng(0)
    for n, c, h, w in SHAPES:
        s = h * w
        for ncs in (True, False):
            if ncs and s == 1:
                continue
            shape = (n, c, s) if ncs else (n * s, c)
            a = _arrays(np, rng, shape, c)
            fns = {}
            for name, k in (("old", old), ("new", new)):
                for step, fn in _calls(k, ncs, a).items():
                    fns[step, name] = fn
            t = {k: v * 1e6 for k, v in _interleaved(fns, args.calls, warmup=1).items()}
            print(f"{(n, c, h, w)} {'ncs' if ncs else 'mc '} " + " | ".join(
                f"{step} old {t[step, 'old']:.0f} new {t[step, 'new']:.0f} "
                f"({t[step, 'old'] / t[step, 'new']:.2f}x)" for step in ("fwd", "bwd", "eval")
            ), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
