"""Per-call overhead of a bnlab BatchNorm layer call against torch's, in one process.

For each shape and mode the median time of

* ``bnlab``  - the bnlab layer call (``layer(x)``; ``layer(x).backward(dy)`` for ``f+b``),
* ``kernel`` - the fused kernel calls that layer call makes, called directly through
  ``bnlab.kernels`` (training forward + running-statistics commit; + backward for ``f+b``;
  inference forward for ``eval``),
* ``torch``  - ``torch.nn.BatchNorm*d`` on the same input,
* ``native`` - torch's functional call (``torch.batch_norm``) that torch's layer makes,

so ``bnlab - kernel`` is bnlab's Python/dispatch overhead per call and ``torch - native`` torch's
module overhead; ``bnlab / torch`` is the whole call's ratio. Rounds are interleaved (each round
times every variant once) and the median over rounds is printed, in microseconds. Run:

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


def _layers(shape):
    c = shape[1]
    pairs = {
        2: (bnlab.BatchNorm1d, torch.nn.BatchNorm1d),
        4: (bnlab.BatchNorm2d, torch.nn.BatchNorm2d),
    }
    ours, theirs = pairs[len(shape)]
    return ours(c), theirs(c)


def _cases(shape, mode):
    """name -> zero-argument callable doing one call of that variant."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    dy = torch.randn(shape)
    ours, theirs = _layers(shape)
    if mode == "eval":
        ours.eval()
        theirs.eval()
    w, b = ours.weight, ours.bias
    rm, rv, nbt = ours.running_mean.clone(), ours.running_var.clone(), torch.tensor(0)
    m = x.numel() // x.shape[1]
    xg = x.clone().requires_grad_()

    def kernel_fwd():
        y, mean, var, _ = K.batch_norm_train_forward(x, w.detach(), b.detach(), 1e-5)
        K.commit_batch_stats(mean, var, rm, rv, nbt, 0.1, m, True)
        return y

    def kernel_fb():
        y, mean, var, inv = K.batch_norm_train_forward(x, w.detach(), b.detach(), 1e-5)
        K.commit_batch_stats(mean, var, rm, rv, nbt, 0.1, m, True)
        K.batch_norm_train_backward(dy, x, mean, inv, w.detach())

    def kernel_eval():
        K.batch_norm_eval_forward(x, rm, rv, w.detach(), b.detach(), 1e-5)

    tm, tv = theirs.running_mean, theirs.running_var

    def native(training):
        return torch.batch_norm(x, theirs.weight, theirs.bias, tm, tv, training, 0.1, 1e-5, False)

    def fb(layer):
        xg.grad = None
        layer(xg).backward(dy)

    if mode == "fwd":
        with_ng = {"bnlab": lambda: ours(x), "kernel": kernel_fwd, "torch": lambda: theirs(x),
                   "native": lambda: native(True)}  # fmt: skip
    elif mode == "eval":
        with_ng = {"bnlab": lambda: ours(x), "kernel": kernel_eval, "torch": lambda: theirs(x),
                   "native": lambda: native(False)}  # fmt: skip
    else:
        def native_fb():
            xg.grad = None
            torch.batch_norm(xg, theirs.weight, theirs.bias, tm, tv, True, 0.1, 1e-5,
                             False).backward(dy)  # fmt: skip

        return {"bnlab": lambda: fb(ours), "kernel": kernel_fb, "torch": lambda: fb(theirs),
                "native": native_fb}  # fmt: skip

    def no_grad(fn):
        def call():
            with torch.no_grad():
                fn()

        return call

    return {k: no_grad(v) for k, v in with_ng.items()}


def measure(shape, mode, rounds: int) -> dict[str, float]:
    cases = _cases(shape, mode)
    for fn in cases.values():  # warm-up (kernel compilation/loading, allocator)
        for _ in range(20):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=400, help="interleaved timed rounds (median)")
    p.add_argument("--threads", type=int, default=1, help="torch and Numba threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    K.warm_up()
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()} (numba "
        f"{numba.get_num_threads()}), float32, backend={bnlab.get_backend()}, median of "
        f"{args.rounds} interleaved rounds, microseconds per call"
    )
    print(
        f"{'shape':>18} {'mode':>5} | {'bnlab':>8} {'kernel':>8} {'overhead':>8} | "
        f"{'torch':>8} {'native':>8} {'overhead':>8} | {'bnlab/torch':>11}"
    )
    for shape in SHAPES:
        for mode in MODES:
            r = measure(shape, mode, args.rounds)
            print(
                f"{str(shape):>18} {mode:>5} | {r['bnlab']:8.1f} {r['kernel']:8.1f} "
                f"{r['bnlab'] - r['kernel']:8.1f} | {r['torch']:8.1f} {r['native']:8.1f} "
                f"{r['torch'] - r['native']:8.1f} | {r['bnlab'] / r['torch']:11.2f}"
            )


if __name__ == "__main__":
    main()
