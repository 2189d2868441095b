"""Per-call Python/dispatch overhead of a bnlab BatchNorm layer call, against torch's.

bnlab's overhead is measured inside each call: every compiled Numba loop of
``bnlab.kernels._numba`` is wrapped with a timer, and a layer call's overhead is its wall time
minus the time spent inside those loops in the same call (so the noise of the kernels' own
time, large on a shared machine, cancels). torch's kernels cannot be timed from inside, so its
overhead is bounded by its whole call on a tiny input of the same rank (``(4, C, 2, 2)`` /
``(4, C)``: microseconds of arithmetic), next to the same for bnlab.

Modes: ``fwd`` = training forward under ``no_grad``, ``f+b`` = training forward + backward,
``eval`` = inference forward under ``no_grad``. Interleaved rounds (each round times every case
once), medians in microseconds. Run (under the machine's lock for heavy measurements)::

    PYTHONPATH=src python benchmarks/bench_overhead.py [--rounds 400] [--threads 1]

Threads: torch and Numba are both set to ``--threads``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import bnlab
from bnlab import kernels as K

SHAPES = [(64, 16, 32, 32), (60, 100)]
MODES = ("fwd", "f+b", "eval")
_inside = [0.0]  # seconds spent inside compiled loops since the last reset


def _instrument() -> None:
    """Wrap every Numba dispatcher of bnlab.kernels._numba so its time adds to _inside."""
    from numba.core.registry import CPUDispatcher

    mod = K.compiled()
    for name in dir(mod):
        fn = getattr(mod, name)
        if isinstance(fn, CPUDispatcher):

            def timed(*args, _fn=fn):
                t0 = time.perf_counter()
                try:
                    return _fn(*args)
                finally:
                    _inside[0] += time.perf_counter() - t0

            setattr(mod, name, timed)


def _pair(shape):
    c = shape[1]
    classes = {
        2: (bnlab.BatchNorm1d, torch.nn.BatchNorm1d),
        4: (bnlab.BatchNorm2d, torch.nn.BatchNorm2d),
    }
    ours, theirs = classes[len(shape)]
    return ours(c), theirs(c)


def _call(layer, mode, x, dy):
    if mode == "f+b":
        x.grad = None
        layer(x).backward(dy)
    else:
        with torch.no_grad():
            layer(x)


def measure(shape, mode, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    tiny = (4, shape[1]) if len(shape) == 2 else (4, shape[1], 2, 2)
    cases = {}
    for key, shp in (("", shape), ("tiny ", tiny)):
        ours, theirs = _pair(shp)
        if mode == "eval":
            ours.eval()
            theirs.eval()
        x = torch.randn(shp).requires_grad_(mode == "f+b")
        dy = torch.randn(shp)
        cases[key + "bnlab"] = (ours, x, dy)
        cases[key + "torch"] = (theirs, x, dy)
    for layer, x, dy in cases.values():  # warm-up (kernel loading, allocator)
        for _ in range(20):
            _call(layer, mode, x, dy)
    total: dict[str, list[float]] = {k: [] for k in cases}
    over: list[float] = []
    for _ in range(rounds):
        for name, (layer, x, dy) in cases.items():
            _inside[0] = 0.0
            t0 = time.perf_counter()
            _call(layer, mode, x, dy)
            t = time.perf_counter() - t0
            total[name].append(t)
            if name == "bnlab":
                over.append(t - _inside[0])
    out = {k: statistics.median(v) * 1e6 for k, v in total.items()}
    out["overhead"] = statistics.median(over) * 1e6
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=400, help="interleaved timed rounds (median)")
    p.add_argument("--threads", type=int, default=1, help="torch and Numba threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    K.warm_up()
    _instrument()
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()} (numba "
        f"{numba.get_num_threads()}), float32, backend={bnlab.get_backend()}, median of "
        f"{args.rounds} interleaved rounds, microseconds per call"
    )
    print(
        f"{'shape':>18} {'mode':>5} | {'bnlab':>8} {'of which':>8} {'torch':>8} | "
        f"{'tiny:':>5} {'bnlab':>7} {'torch':>7}"
    )
    print(f"{'':>18} {'':>5} | {'':>8} {'overhead':>8} {'':>8} | {'':>5}")
    for shape in SHAPES:
        for mode in MODES:
            r = measure(shape, mode, args.rounds)
            print(
                f"{str(shape):>18} {mode:>5} | {r['bnlab']:8.1f} {r['overhead']:8.1f} "
                f"{r['torch']:8.1f} | {'':>5} {r['tiny bnlab']:7.1f} {r['tiny torch']:7.1f}"
            )


if __name__ == "__main__":
    main()
