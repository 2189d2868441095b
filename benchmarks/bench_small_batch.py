"""CPU cost of one training example in `bnlab run batch-size`, per normalization and batch size.

Each case trains ``SmallCNN(1, 10, widths, norm)`` with cross-entropy and SGD + momentum on a
fixed random batch (BN, batch renorm, GN and LN: SGD batch B; ghost BN: SGD batch ``--ghost-batch``
with ghost batches of B) and reports the CPU time of one step divided by the SGD batch: what one
example costs. CPU time (``time.process_time``, this process only) rather than wall time, because
the figure feeds an estimate of a run's length and the machine may be shared; the thread count is
fixed and printed. Each figure is the median of ``--rounds`` rounds of steps covering about
``--examples`` examples.

    PYTHONPATH=src python benchmarks/bench_small_batch.py [--threads 1] [--sizes 2,8,32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from bnlab.layers import renorm_schedule
from bnlab.models import SmallCNN

NORMS = ("bn", "brn", "ghost", "gn", "ln")


def cost_per_example(norm: str, b: int, ghost_batch: int, widths: list[int], examples: int,
                     rounds: int) -> float:  # fmt: skip
    """Median CPU seconds per training example of one SGD step."""
    sgd = ghost_batch if norm == "ghost" else b
    kwargs: dict = {}
    if norm == "brn":
        kwargs = renorm_schedule(1000)
    elif norm == "ghost":
        kwargs = {"virtual_batch_size": b}
    torch.manual_seed(0)
    model = SmallCNN(1, 10, widths, norm, kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(sgd, 1, 28, 28), torch.randint(10, (sgd,))

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    steps = max(3, examples // sgd)
    times = []
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(steps):
            step()
        times.append((time.process_time() - t) / (steps * sgd))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sizes", default="2,8,32", help="normalization batch sizes B")
    p.add_argument("--ghost-batch", type=int, default=64)
    p.add_argument("--widths", default="16,32,64")
    p.add_argument("--examples", type=int, default=256, help="examples per round")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        import numba

        numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover - numba is a dependency
        pass
    sizes = [int(s) for s in a.sizes.split(",")]
    widths = [int(w) for w in a.widths.split(",")]
    print(f"torch {torch.__version__}, {a.threads} thread(s), NUMBA_NUM_THREADS="
          f"{os.environ.get('NUMBA_NUM_THREADS', 'unset')}, load {os.getloadavg()[0]:.1f}; "
          "ms of CPU per training example (median of rounds)")  # fmt: skip
    print("| norm | " + " | ".join(f"B = {b}" for b in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for norm in NORMS:
        cells = [cost_per_example(norm, b, a.ghost_batch, widths, a.examples, a.rounds)
                 for b in sizes]  # fmt: skip
        print(f"| {norm} | " + " | ".join(f"{1e3 * c:.2f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
