"""Does a memory-bound loop move more bytes per second when it issues its loads and stores
more slowly? The same Numba loop, ``y = 1.5 x + 0.5`` over a tensor larger than the caches, as
one flat loop (LLVM vectorizes and unrolls it) and split into blocks of a few values (an inner
loop too short to unroll), with the caches flushed before every call; a read alone (a sum) and a
write alone (a fill) the same two ways; and torch's own ``torch.mul(x, 1.5, out=y)`` and copy.

    PYTHONPATH=src python benchmarks/bench_issue_rate.py [--mb 25.7] [--rounds 25] [--threads 1]

On the AMD EPYC of benchmarks/RESULTS.md ("session 3") the blocked read+write loop was about
1.2-1.4x faster than the flat one while reads alone and writes alone were not, and torch's
plain two-vector AVX2 loop faster than both in this mix (not in every mix: see RESULTS.md):
part of why bnlab's channels_last eval trails torch's there. Run it on another CPU
(``NUMBA_CPU_NAME=haswell`` compiles the Numba loops for AVX2, in a separate
``NUMBA_CACHE_DIR``) to see whether the effect is general before tuning a kernel for it.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=25.7, help="tensor size in MB (float32)")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--block", type=int, default=16, help="values per block of the blocked loops")
    args = p.parse_args(argv)
    import numba
    import numpy as np
    import torch

    from bnlab.bench import _interleaved, cache_flusher, machine_text
    from bnlab.kernels import compiled

    torch.set_num_threads(args.threads)
    fm = compiled()._FM  # (also makes Numba follow torch's thread count)

    @numba.njit(fastmath=fm)
    def affine(a, b, B):
        n = a.shape[0]
        for s in range(0, n, B):
            e = min(n, s + B)
            xs, ys = a[s:e], b[s:e]
            for i in range(e - s):
                ys[i] = xs[i] * np.float32(1.5) + np.float32(0.5)

    @numba.njit(fastmath=fm)
    def total(a, B):
        n, t = a.shape[0], 0.0
        for s in range(0, n, B):
            e = min(n, s + B)
            xs, acc = a[s:e], np.float32(0.0)
            for i in range(e - s):
                acc += xs[i]
            t += acc
        return t

    @numba.njit(fastmath=fm)
    def fill(b, B):
        n = b.shape[0]
        for s in range(0, n, B):
            e = min(n, s + B)
            ys = b[s:e]
            for i in range(e - s):
                ys[i] = np.float32(1.0)

    n = int(args.mb * (1 << 20) / 4)
    xt, yt = torch.randn(n), torch.empty(n)
    x, y = xt.numpy(), yt.numpy()
    B = args.block
    runs = {
        "read+write, flat": lambda: affine(x, y, n),
        f"read+write, blocks of {B}": lambda: affine(x, y, B),
        "read, flat": lambda: total(x, n),
        f"read, blocks of {B}": lambda: total(x, B),
        "write, flat": lambda: fill(y, n),
        f"write, blocks of {B}": lambda: fill(y, B),
        "torch.mul out=": lambda: torch.mul(xt, 1.5, out=yt),
        "torch copy_": lambda: yt.copy_(xt),
    }
    t = _interleaved(runs, args.rounds, warmup=1, before=cache_flusher())
    print(machine_text())
    print(f"{n * 4 / 1e6:.1f} MB float32, threads {numba.get_num_threads()}, median of "
          f"{args.rounds} rounds, caches flushed before every call")  # fmt: skip
    for k, v in t.items():
        print(f"  {k:28s} {v * 1e3:8.3f} ms")
    rw = t["read+write, flat"] / t[f"read+write, blocks of {B}"]
    print(f"read+write: flat / blocked = {rw:.2f} (above 1: the slower-issuing loop is faster)")


if __name__ == "__main__":
    main()
