"""BatchNorm1d on a transposed sequence: bnlab's training step against torch's.

Sequence models keep activations as ``(N, L, C)`` and call BatchNorm1d on ``x.transpose(1, 2)``,
an ``(N, C, L)`` tensor with its channels innermost. Two uses are timed, each a training step
(forward and backward) from an ``(N, L, C)`` leaf that requires grad:

* ``round`` - the output transposed back, as those models write it: loss
  ``(bn(x.transpose(1, 2)).transpose(1, 2) * g).sum()``, the gradient arriving in the
  sequence's own layout;
* ``one`` - the output used as it is: ``bn(x.transpose(1, 2)).backward(g)`` with a contiguous
  ``(N, C, L)`` gradient.

Rounds are interleaved (each round times every case once, bnlab and torch alternating); each
time is the median of ``--steps`` steps after 5, and the table gives the median over
``--rounds`` rounds in milliseconds and ``torch time / bnlab time`` (above 1: bnlab faster).
torch and Numba threads are both set to ``--threads``; freed memory stays in the heap
(:func:`bnlab.bench.steady_heap`), as in the layer benchmark. Run (the machine otherwise idle)::

    PYTHONPATH=src python benchmarks/bench_sequence.py --threads 2 [--rounds 5] [--steps 20] \
        [--shapes 128x100x256,32x256x256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bnlab  # noqa: E402
from bnlab.bench import steady_heap  # noqa: E402

SHAPES = [
    "16x2048x32", "32x1024x64", "64x256x128", "128x100x256", "32x256x256", "32x128x512",
    "16x128x1024",
]  # fmt: skip


def _shape(text: str) -> tuple[int, int, int]:
    try:
        n, length, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: expected NxLxC, got {text!r}") from None
    if min(n, length, c) < 1:
        raise argparse.ArgumentTypeError(f"--shapes: sizes must be positive, got {text!r}")
    return n, length, c


def step_time(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, way: str, steps: int):
    """Median seconds of one training step of ``layer`` on the transposed leaf x."""
    times = []
    for i in range(steps + 5):
        leaf = x.detach().requires_grad_()
        start = time.perf_counter()
        y = layer(leaf.transpose(1, 2))
        if way == "round":
            (y.transpose(1, 2) * g).sum().backward()
        else:
            y.backward(g)
        if i >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help="comma-separated NxLxC shapes of the (N, L, C) sequence")  # fmt: skip
    args = parser.parse_args(argv)
    shapes = [_shape(s) for s in args.shapes.split(",") if s]
    torch.set_num_threads(args.threads)
    heap = steady_heap()
    print(f"torch {torch.__version__}, bnlab and torch threads={args.threads}, float32, "
          f"heap: {heap}; ms, medians of {args.rounds} rounds")  # fmt: skip
    print(f"{'(N, L, C)':>17} | {'round bnlab':>11} {'torch':>7} {'ratio':>5} | "
          f"{'one bnlab':>11} {'torch':>7} {'ratio':>5}")  # fmt: skip
    for n, length, c in shapes:
        x = torch.randn(n, length, c)
        grads = {"round": torch.randn(n, length, c), "one": torch.randn(n, c, length)}
        ours, theirs = bnlab.BatchNorm1d(c), torch.nn.BatchNorm1d(c)
        cells = []
        for way, g in grads.items():
            a, b = [], []
            for _ in range(args.rounds):
                a.append(step_time(ours, x, g, way, args.steps))
                b.append(step_time(theirs, x, g, way, args.steps))
            ma, mb = statistics.median(a), statistics.median(b)
            cells.append(f"{ma * 1e3:11.2f} {mb * 1e3:7.2f} {mb / ma:5.2f}")
        print(f"{str((n, length, c)):>17} | {cells[0]} | {cells[1]}", flush=True)


if __name__ == "__main__":
    main()
