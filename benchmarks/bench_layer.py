"""First layer benchmark: bnlab's reference path vs torch.nn.BatchNorm2d, training mode.

Prints, per shape, the median time of forward and of forward+backward for both layers and the
ratio bnlab / torch (above 1 means bnlab is slower), with the thread count. Run:

    .venv/bin/python benchmarks/bench_layer.py [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import bnlab

SHAPES = [(64, 64, 32, 32), (128, 256, 14, 14), (32, 256, 28, 28), (60, 100, 1, 1)]


def median_time(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_shape(shape, repeats: int) -> dict:
    c = shape[1]
    x = torch.randn(shape)
    dy = torch.randn(shape)
    layers = {"bnlab": bnlab.BatchNorm2d(c), "torch": torch.nn.BatchNorm2d(c)}
    out = {}
    for name, layer in layers.items():
        xg = x.clone().requires_grad_()

        def fwd(layer=layer):
            with torch.no_grad():
                layer(x)

        def fwd_bwd(layer=layer, xg=xg):
            xg.grad = None
            layer(xg).backward(dy)

        out[name] = (median_time(fwd, repeats), median_time(fwd_bwd, repeats))
    return out


def main(argv=None) -> None:
    with bnlab.use_backend("reference"):  # the fused kernels have their own bench_kernels.py
        _main(argv)


def _main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20, help="timed runs per case (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, float32, training mode,"
        f" median of {args.repeats}"
    )
    print(
        f"{'shape (N,C,H,W)':>20} | {'fwd bnlab':>10} {'fwd torch':>10} {'ratio':>6} | "
        f"{'f+b bnlab':>10} {'f+b torch':>10} {'ratio':>6}"
    )
    for shape in SHAPES:
        r = bench_shape(shape, args.repeats)
        (fb, bb), (ft, bt) = r["bnlab"], r["torch"]
        print(
            f"{str(shape):>20} | {fb * 1e3:8.2f}ms {ft * 1e3:8.2f}ms {fb / ft:6.2f} | "
            f"{bb * 1e3:8.2f}ms {bt * 1e3:8.2f}ms {bb / bt:6.2f}"
        )


if __name__ == "__main__":
    main()
