"""Each pass of the fused kernels against the memory traffic it cannot avoid.

    PYTHONPATH=src python benchmarks/bench_passes.py [--threads 1] [--rounds 21] [--relu] [--warm]
        [--shapes N,C,H,W ...]

A training step of the kernels is four passes over memory (see :mod:`bnlab.kernels`):

=========== =================================== ==============================
pass        reads                               writes
=========== =================================== ==============================
statistics  x                                   -
normalize   x                                   y
grad sums   dy, x                               -
dx          dy, x                               dx
=========== =================================== ==============================

(The fused ReLU's mask is recomputed from x with the normalize pass's coefficients: no y read.)

For each shape and layout (contiguous ``ncs``, channels_last ``mc``; a dense ``(M, C)`` given as
``M,C,1,1`` has the second only) this times every pass on preallocated float32 arrays (the
compiled loops called directly: no allocation, no Python wrapper) beside two loops over the
same bytes compiled the same way: a read (the sum of x) and a copy (x into y). A pass's floor
is ``reads * read + writes * (copy - read)`` from the same run; the table prints each pass as a
multiple of its floor, and the whole step (the four passes) and its floor as multiples of a
copy. By default every call finds cold caches (a buffer larger
than any last-level cache is written before it, :func:`bnlab.bench.cache_flusher`), as a layer
of a real model finds its tensors after the other layers' have passed through the caches;
``--warm`` skips that, for tensors that fit in the last-level cache.
Medians of interleaved rounds in a shuffled order, thread count as given (torch's and Numba's).
"""

from __future__ import annotations

import argparse

SHAPES = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8), (64, 64, 32, 32),
          (128, 256, 14, 14), (32, 128, 56, 56), (32, 2048, 7, 7), (4096, 1024, 1, 1)]  # fmt: skip


def _references(numba, np):
    """(read, copy): plain loops over a flat float32 array, vectorized as the kernels are."""
    from bnlab.kernels import _numba as K

    @numba.njit(parallel=True, fastmath=K._FM, nogil=True)
    def read(x):
        s = np.float32(0.0)
        for i in numba.prange(x.shape[0]):
            s += x[i]
        return s

    @numba.njit(parallel=True, fastmath=K._FM, nogil=True)
    def copy(x, y):
        for i in numba.prange(x.shape[0]):
            y[i] = x[i]

    return read, copy


def _passes(K, np, shape, relu: bool):
    """{pass: (callable, reads, writes)} for one layout: ``shape`` is (N, C, S) or (M, C)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32) * 2 + 1
    dy = rng.standard_normal(shape, dtype=np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    c = shape[1]
    # normalize: (a, c); dx: (mean, A, B, D) (see bnlab.kernels._numba)
    coef = np.stack([np.zeros(c), np.ones(c), np.full(c, 0.1), np.full(c, 0.01)]).astype(np.float32)
    # the ReLU mask, recomputed from x with the normalize pass's (a, c) as the layer's backward does
    mk = np.ascontiguousarray(coef[1:3])
    coef6 = np.concatenate([coef, mk])
    floor = np.float32(0.0)
    if len(shape) == 3:
        bm, bm2 = np.empty((shape[0], c)), np.empty((shape[0], c))
        p1, p2 = np.empty((shape[0], c)), np.empty((shape[0], c))
        mean = np.zeros(c, np.float32)
        calls = {
            "stats": lambda: K._ncs_sums_par(x, bm, bm2),
            "normalize": lambda: K._ncs_normalize_par(x, coef[1:3], relu, y, False),
            "grad sums": lambda: K._ncs_gsums_par(dy, x, x, relu, mean, mk, floor, p1, p2),
            "dx": lambda: K._ncs_dx_par(dy, x, x, relu, coef6, floor, dx),
        }
    else:
        m = shape[0]
        r = K.mc_rows_per_chunk(m, c)
        k = (m + r - 1) // r
        cm, cm2 = np.empty((k, c)), np.empty((k, c))
        p1, p2 = np.zeros((k, c)), np.zeros((k, c))
        z = K._tile(x[:1].astype(np.float64), np.float64)[0]  # the shift x_0, tiled
        t2, t6 = K._tile(coef[1:3], np.float32, True), K._tile(coef6, np.float32, True)
        u = K._tile(np.concatenate([coef[:1], mk]), np.float32)  # the mean, then the mask's
        calls = {
            "stats": lambda: K._mc_sums_par(x, z, r, cm, cm2),
            "normalize": lambda: K._mc_normalize_par(x, t2, relu, y, r, False),
            "grad sums": lambda: K._mc_gsums_par(dy, x, x, relu, u, floor, r, p1, p2),
            "dx": lambda: K._mc_dx_par(dy, x, x, relu, t6, floor, dx, r),
        }
    traffic = {"stats": (1, 0), "normalize": (1, 1), "grad sums": (2, 0), "dx": (2, 1)}
    return x, y, {n: (f, *traffic[n]) for n, f in calls.items()}


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        n, c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: {text!r} is not N,C,H,W") from None
    return n, c, h, w


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--relu", action="store_true", help="the fused BN+ReLU's passes")
    p.add_argument("--warm", action="store_true", help="do not flush the caches between calls")
    p.add_argument("--shapes", nargs="+", metavar="N,C,H,W", type=_shape, default=SHAPES,
                   help="(N, C, H, W) shapes instead of the ResNet ones (dense (M, C): M,C,1,1)")
    args = p.parse_args(argv)
    import numba
    import numpy as np
    import torch

    from bnlab.bench import _interleaved, cache_flusher, machine_text
    from bnlab.kernels import compiled

    torch.set_num_threads(args.threads)
    K = compiled()  # (follows torch's thread count)
    read, copy = _references(numba, np)
    flush = None if args.warm else cache_flusher()
    print(machine_text())
    caches, relu = ("warm" if args.warm else "cold"), ("fused" if args.relu else "off")
    print(f"threads {numba.get_num_threads()}, median of {args.rounds} rounds, float32, "
          f"{caches} caches, ReLU {relu}; each pass as a multiple of its floor "
          "(reads * read + writes * (copy - read))")  # fmt: skip
    print("| shape | layout | read ms | copy ms | stats | normalize | grad sums | dx "
          "| step / copy | floor / copy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, c, h, w in args.shapes:
        for layout in ("ncs", "mc") if h * w > 1 else ("mc",):  # (a dense (M, C): rows only)
            shape = (n, c, h * w) if layout == "ncs" else (n * h * w, c)
            x, y, passes = _passes(K, np, shape, args.relu)
            xf, yf = x.reshape(-1), y.reshape(-1)
            runs = {"read": lambda xf=xf: read(xf), "copy": lambda xf=xf, yf=yf: copy(xf, yf)}
            runs.update({name: v[0] for name, v in passes.items()})
            t = _interleaved(runs, args.rounds, warmup=1, before=flush)
            write = max(t["copy"] - t["read"], 0.0)
            floors = {k: r * t["read"] + wr * write for k, (_, r, wr) in passes.items()}
            cells = " | ".join(f"{t[k] / floors[k]:.2f}" for k in passes)
            step = sum(t[k] for k in passes)
            print(f"| {(n, c, h, w)} | {layout} | {t['read'] * 1e3:.3f} | {t['copy'] * 1e3:.3f} | "
                  f"{cells} | {step / t['copy']:.2f} | {sum(floors.values()) / t['copy']:.2f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
